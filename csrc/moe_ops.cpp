// The moe_kernels custom ops, for programs without Python.
//
// An exported DiT-MoE (python -m dit.export) calls by name moe_kernels::topk_gating (or
// moe_kernels::expert_choice_gating), moe_kernels::sort_by_expert for a token-choice dispatch,
// and moe_kernels::experts, the one experts op; in Python the moe_kernels package registers
// them, here this file does. Forward only, in ATen, so any device torch was built for runs them;
// it follows the package's PyTorch path step for step (stable sorts, so the same experts and
// tokens win ties; each token's slots summed in slot order).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_gating(
    const Tensor& logits, int64_t k, bool normalize, c10::string_view /*backend*/, c10::string_view score,
    const std::optional<Tensor>& bias, int64_t num_groups, int64_t topk_groups, double scale) {
  const Tensor scores = score == "sigmoid" ? logits.to(at::kFloat).sigmoid() : logits.to(at::kFloat).softmax(-1);
  Tensor rank = bias.has_value() ? scores + bias->to(at::kFloat) : scores;
  const int64_t tokens = rank.size(0), experts = rank.size(1);
  if (num_groups > 1) {
    // A group ranks by the sum of its two best entries; only the best topk_groups stay eligible.
    const int64_t size = experts / num_groups;
    const Tensor grouped = rank.view({tokens, num_groups, size});
    const Tensor best_two = std::get<0>(grouped.sort(true, -1, true)).narrow(-1, 0, std::min<int64_t>(2, size));
    const Tensor groups = std::get<1>(best_two.sum(-1).sort(true, -1, true)).narrow(-1, 0, topk_groups);
    const Tensor kept = at::zeros({tokens, num_groups}, rank.options().dtype(at::kBool)).scatter(1, groups, true);
    rank = grouped.masked_fill(kept.unsqueeze(-1).logical_not(), -std::numeric_limits<double>::infinity())
               .view({tokens, experts});
  }
  const Tensor chosen = std::get<1>(rank.sort(true, -1, true)).narrow(1, 0, k).contiguous();
  Tensor weights = scores.gather(1, chosen);
  if (bias.has_value()) weights = weights + (bias->to(at::kFloat) * 0).sum();  // a non-finite bias: all NaN
  if (normalize) weights = weights / weights.sum(-1, true);
  if (scale != 1.0) weights = weights * scale;
  const Tensor flat = chosen.reshape(-1);
  const Tensor counts = at::zeros({experts}, logits.options().dtype(at::kInt))
                            .index_add_(0, flat, at::ones_like(flat, flat.options().dtype(at::kInt)));
  return {weights, chosen, scores, counts, scores.sum(0)};
}

Tensor activate(const Tensor& preact, const std::string& activation) {
  // Gated: act(gate) * up over [gate, up] halves.
  for (const auto& [gated, elementwise] : {std::pair<const char*, const char*>{"swiglu", "silu"},
                                           {"geglu", "gelu"}, {"geglu_tanh", "gelu_tanh"}}) {
    if (activation == gated) {
      const int64_t hidden = preact.size(1) / 2;
      return activate(preact.narrow(1, 0, hidden), elementwise) * preact.narrow(1, hidden, hidden);
    }
  }
  if (activation == "gelu") return at::gelu(preact);
  if (activation == "gelu_tanh") return at::gelu(preact, "tanh");
  if (activation == "silu") return at::silu(preact);
  if (activation == "relu") return at::relu(preact);
  if (activation == "relu2") return at::relu(preact).square();
  TORCH_CHECK(false, "experts: unknown activation '", activation, "'");
}

// Expert e's MLP on its rows: act(rows @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e].
Tensor expert_mlp(const Tensor& rows, int64_t e, const Tensor& w_in, const Tensor& w_out,
                  const std::optional<Tensor>& b_in, const std::optional<Tensor>& b_out, const std::string& activation) {
  Tensor preact = rows.mm(w_in[e]);
  if (b_in.has_value()) preact = preact + (*b_in)[e];
  Tensor out = activate(preact, activation).mm(w_out[e]);
  if (b_out.has_value()) out = out + (*b_out)[e];
  return out;
}

// The slots of experts [T, k] sorted stably by expert: (slot_of_row, token_of_row, offsets), int32.
std::tuple<Tensor, Tensor, Tensor> sort_by_expert(const Tensor& experts, int64_t num_experts,
                                                  c10::string_view /*backend*/) {
  const int64_t k = experts.size(1);
  auto [sorted, slot_of_row] = experts.reshape(-1).sort(true, 0, false);
  const Tensor offsets = at::searchsorted(sorted, at::arange(num_experts, sorted.options()), false, true);
  return {slot_of_row.to(at::kInt), at::div(slot_of_row, k, "floor").to(at::kInt), offsets.to(at::kInt)};
}

// The experts on a dispatch: expert e computes rows offsets[e-1]:offsets[e] (the tokens
// token_of_row), each row's output goes to its slot, and each token's slots are summed with their
// weights in slot order: k consecutive slots per token, or starts[t]:starts[t+1].
std::tuple<Tensor, Tensor, Tensor, Tensor> experts(
    const Tensor& x, const Tensor& weights, const Tensor& slot_of_row, const Tensor& token_of_row,
    const Tensor& offsets, const std::optional<Tensor>& starts, const Tensor& w_in, const Tensor& w_out,
    const std::optional<Tensor>& b_in, const std::optional<Tensor>& b_out, const std::optional<Tensor>& w_in_scale,
    const std::optional<Tensor>& /*w_out_scale*/, c10::string_view activation, c10::string_view /*backend*/,
    bool /*save_preact*/, bool /*save_h*/, bool /*save_out*/, bool quantize) {
  TORCH_CHECK(!quantize && !w_in_scale.has_value(),
              "experts: FP8 experts are not in the C++ runtime; export the model in bf16");
  const int64_t tokens = x.size(0), dim = x.size(1), slots = weights.size(0);
  const Tensor rows = x.index_select(0, token_of_row);
  Tensor out_rows = at::empty({slots, dim}, x.options());
  const Tensor ends = offsets.cpu();
  const std::string act(activation);
  int64_t start = 0;
  for (int64_t e = 0; e < w_in.size(0); ++e) {
    const int64_t end = ends[e].item<int64_t>();
    if (end > start) {
      out_rows.slice(0, start, end).copy_(expert_mlp(rows.slice(0, start, end), e, w_in, w_out, b_in, b_out, act));
    }
    start = end;
  }
  const Tensor out = at::empty_like(out_rows).index_copy_(0, slot_of_row.to(at::kLong), out_rows);
  const Tensor weighted = out.to(at::kFloat) * weights.to(at::kFloat).unsqueeze(1);
  Tensor y;
  if (starts.has_value()) {
    y = at::segment_reduce(weighted, "sum", std::nullopt, std::nullopt, starts->to(at::kLong), 0, true);
  } else {
    y = tokens == 0 ? at::zeros({0, dim}, weighted.options()) : weighted.view({tokens, slots / tokens, dim}).sum(1);
  }
  // What the training op keeps for its backward: nothing here, but the same outputs.
  return {y.to(x.scalar_type()), x.new_empty({0, w_in.size(2)}), x.new_empty({0, w_out.size(1)}),
          x.new_empty({0, dim})};
}

// Each expert's `capacity` highest softmax scores among each group of `group_size` tokens; a
// stable descending sort: ties to the lower token, NaN first.
std::tuple<Tensor, Tensor, Tensor> expert_choice_gating(const Tensor& logits, int64_t capacity, int64_t group_size,
                                                        c10::string_view /*backend*/) {
  const Tensor probs = logits.to(at::kFloat).softmax(-1);
  const int64_t tokens = probs.size(0), experts = probs.size(1);
  const Tensor scores = probs.view({tokens / group_size, group_size, experts}).transpose(1, 2);
  auto [values, order] = scores.sort(true, -1, true);
  const Tensor first = at::arange(0, tokens, group_size, order.options()).view({-1, 1, 1});
  return {values.narrow(-1, 0, capacity).contiguous(), (order.narrow(-1, 0, capacity) + first).contiguous(), probs};
}

}  // namespace

TORCH_LIBRARY(moe_kernels, m) {
  m.def("topk_gating(Tensor logits, SymInt k, bool normalize, str backend, str score, Tensor? bias, SymInt num_groups, "
        "SymInt topk_groups, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("expert_choice_gating(Tensor logits, SymInt capacity, SymInt group_size, str backend) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("sort_by_expert(Tensor experts, SymInt num_experts, str backend) -> (Tensor, Tensor, Tensor)");
  m.def("experts(Tensor x, Tensor weights, Tensor slot_of_row, Tensor token_of_row, Tensor offsets, Tensor? starts, "
        "Tensor w_in, Tensor w_out, Tensor? b_in, Tensor? b_out, Tensor? w_in_scale, Tensor? w_out_scale, "
        "str activation, str backend, bool save_preact, bool save_h, bool save_out, bool quantize) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_kernels, CompositeExplicitAutograd, m) {
  m.impl("topk_gating", &topk_gating);
  m.impl("expert_choice_gating", &expert_choice_gating);
  m.impl("sort_by_expert", &sort_by_expert);
  m.impl("experts", &experts);
}
