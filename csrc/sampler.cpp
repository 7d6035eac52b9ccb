#include "sampler.h"

#include <ATen/ATen.h>

#include <cmath>
#include <functional>
#include <sstream>
#include <stdexcept>

namespace dit {
namespace {

const std::string& field(const std::unordered_map<std::string, std::string>& metadata, const std::string& key) {
  const auto found = metadata.find(key);
  if (found == metadata.end()) throw std::invalid_argument("the package's metadata has no '" + key + "'");
  return found->second;
}

// A whole-number field of at least `low`; anything else is a package this program cannot read.
int64_t integer(const std::unordered_map<std::string, std::string>& metadata, const std::string& key, int64_t low) {
  const std::string& text = field(metadata, key);
  const std::optional<int64_t> value = whole_integer(text);
  if (!value || *value < low) {
    throw std::invalid_argument("the package's metadata has '" + key + "' = '" + text + "', expected an integer >= " +
                                std::to_string(low));
  }
  return *value;
}

// std::stoll and std::stod read a prefix and throw on none: a whole-text parse, without throwing.
template <typename Number, typename Parse>
std::optional<Number> whole(const std::string& text, Parse parse) {
  size_t used = 0;
  try {
    const Number value = parse(text, &used);
    if (used == text.size()) return value;
  } catch (const std::logic_error&) {
  }
  return std::nullopt;
}

constexpr double kTimeScale = 1000.0;  // dit.diffusion.rectified_flow.TIME_SCALE

}  // namespace

std::optional<int64_t> whole_integer(const std::string& text) {
  return whole<int64_t>(text, [](const std::string& t, size_t* used) { return std::stoll(t, used); });
}

std::optional<double> whole_number(const std::string& text) {
  return whole<double>(text, [](const std::string& t, size_t* used) { return std::stod(t, used); });
}

PackageInfo read_package_info(const std::unordered_map<std::string, std::string>& metadata) {
  const auto format = metadata.find("format");
  if (format != metadata.end() && format->second == "dit-moe-denoiser/1") {
    throw std::invalid_argument(
        "this package was written by an older python -m dit.export (format 1, whose experts ops this sampler "
        "no longer has): export the checkpoint again");
  }
  if (format == metadata.end() || format->second != "dit-moe-denoiser/2") {
    throw std::invalid_argument("not a package written by python -m dit.export");
  }
  PackageInfo info;
  info.objective = field(metadata, "objective");
  if (info.objective != "diffusion" && info.objective != "rectified-flow") {
    throw std::invalid_argument("the package's metadata names an unknown objective '" + info.objective + "'");
  }
  info.device = field(metadata, "device");
  if (info.device != "cpu" && info.device != "cuda") {
    throw std::invalid_argument("the package's metadata names an unknown device '" + info.device + "'");
  }
  info.batch = integer(metadata, "batch", 1);
  info.in_channels = integer(metadata, "in_channels", 1);
  info.input_size = integer(metadata, "input_size", 1);
  info.num_classes = integer(metadata, "num_classes", 1);
  info.cfg = integer(metadata, "cfg", 0) != 0;
  info.latent = integer(metadata, "latent", 0) != 0;
  info.learn_sigma = integer(metadata, "learn_sigma", 0) != 0;
  if (info.objective == "diffusion") {
    std::stringstream values(field(metadata, "alphas_cumprod"));
    for (std::string value; std::getline(values, value, ',');) {
      const std::optional<double> alpha = whole_number(value);
      if (!alpha || !(*alpha > 0 && *alpha < 1)) {
        throw std::invalid_argument("the package's metadata holds a bad alphas_cumprod value '" + value + "'");
      }
      info.alphas_cumprod.push_back(*alpha);
    }
    if (static_cast<int64_t>(info.alphas_cumprod.size()) != kNumTimesteps) {
      throw std::invalid_argument("the package's metadata holds " + std::to_string(info.alphas_cumprod.size()) +
                                  " alphas_cumprod, expected " + std::to_string(kNumTimesteps));
    }
  }
  return info;
}

std::vector<int64_t> kept_timesteps(int64_t steps, int64_t num_timesteps, bool ddim) {
  if (steps < 2 || steps > num_timesteps) {
    throw std::invalid_argument(std::string(ddim ? "ddim" : "ddpm") + " sampling takes 2 to " +
                                std::to_string(num_timesteps) + " steps, got " + std::to_string(steps));
  }
  std::vector<int64_t> kept;
  for (int64_t stride = 1; ddim && stride < num_timesteps; ++stride) {
    if ((num_timesteps + stride - 1) / stride == steps) {
      for (int64_t t = 0; t < num_timesteps; t += stride) kept.push_back(t);
      return kept;
    }
  }
  // np.linspace's points (i * step, the last exactly the end), rounded half to even as np.round does.
  const double step = (num_timesteps - 1.0) / (steps - 1);
  for (int64_t i = 0; i < steps; ++i) {
    const double point = i == steps - 1 ? num_timesteps - 1.0 : i * step;
    const auto t = static_cast<int64_t>(std::nearbyint(point));
    if (kept.empty() || kept.back() != t) kept.push_back(t);
  }
  return kept;
}

std::vector<int64_t> logsnr_timesteps(int64_t steps, const std::vector<double>& alphas_cumprod) {
  const auto num_timesteps = static_cast<int64_t>(alphas_cumprod.size());
  if (steps < 2 || steps > num_timesteps) {
    throw std::invalid_argument("dpm++2m sampling takes 2 to " + std::to_string(num_timesteps) + " steps, got " +
                                std::to_string(steps));
  }
  std::vector<double> lambda(num_timesteps);
  for (int64_t t = 0; t < num_timesteps; ++t) {
    lambda[t] = 0.5 * std::log(alphas_cumprod[t] / (1.0 - alphas_cumprod[t]));
  }
  // np.linspace's points: first + i * step, the last exactly the end; np.argmin: the first nearest.
  const double first = lambda.front(), last = lambda.back(), step = (last - first) / (steps - 1);
  std::vector<int64_t> kept(steps);
  for (int64_t i = 0; i < steps; ++i) {
    const double target = i == steps - 1 ? last : first + i * step;
    int64_t best = 0;
    for (int64_t t = 1; t < num_timesteps; ++t) {
      if (std::abs(lambda[t] - target) < std::abs(lambda[best] - target)) best = t;
    }
    kept[i] = i > 0 ? std::max(best, kept[i - 1] + 1) : best;
  }
  for (int64_t i = 0; i < steps; ++i) kept[i] = std::min(kept[i], num_timesteps - steps + i);
  return kept;
}

namespace {

// A respaced schedule as dit.diffusion.GaussianDiffusion builds it, in float64: betas from the
// kept alphas_cumprod, then the cumulative product again (abar), and abar of the step before.
struct Respaced {
  std::vector<double> betas, abar, abar_prev;
};

Respaced respace(const std::vector<int64_t>& kept, const std::vector<double>& alphas_cumprod) {
  const auto n = static_cast<int64_t>(kept.size());
  Respaced r{std::vector<double>(n), std::vector<double>(n), std::vector<double>(n)};
  double product = 1.0;
  for (int64_t i = 0; i < n; ++i) {
    r.betas[i] = 1.0 - alphas_cumprod[kept[i]] / (i > 0 ? alphas_cumprod[kept[i - 1]] : 1.0);
    r.abar_prev[i] = product;
    product *= 1.0 - r.betas[i];
    r.abar[i] = product;
  }
  return r;
}

// The predicted x0 of step i, as GaussianDiffusion.p_mean_variance computes it (float32 tables).
at::Tensor predict_x0(const at::Tensor& x, const at::Tensor& eps, double abar, bool clip) {
  const auto recip = static_cast<float>(std::sqrt(1.0 / abar));
  const auto recipm1 = static_cast<float>(std::sqrt(1.0 / abar - 1.0));
  at::Tensor x0 = recip * x - recipm1 * eps;
  return clip ? x0.clamp(-1, 1) : x0;
}

}  // namespace

at::Tensor dpm_solver_sample(const Denoise& denoise, at::Tensor noise, const std::vector<double>& alphas_cumprod,
                             int64_t steps, bool clip) {
  const std::vector<int64_t> kept = logsnr_timesteps(steps, alphas_cumprod);
  const Respaced r = respace(kept, alphas_cumprod);
  const int64_t channels = noise.size(1);
  at::Tensor x = std::move(noise), x0_prev;
  double h_prev = 0;
  for (int64_t i = static_cast<int64_t>(kept.size()) - 1; i >= 0; --i) {
    const at::Tensor t = at::full({x.size(0)}, static_cast<float>(kept[i]), x.options());
    const at::Tensor x0 = predict_x0(x, denoise(x, t).narrow(1, 0, channels), r.abar[i], clip);
    if (r.abar_prev[i] >= 1.0) return x0;
    const double alpha = std::sqrt(r.abar[i]), sigma = std::sqrt(1.0 - r.abar[i]);
    const double alpha_next = std::sqrt(r.abar_prev[i]), sigma_next = std::sqrt(1.0 - r.abar_prev[i]);
    const double h = std::log(alpha_next / sigma_next) - std::log(alpha / sigma);
    const at::Tensor d = x0_prev.defined() ? x0 + (x0 - x0_prev) * (h / (2 * h_prev)) : x0;
    x = (sigma_next / sigma) * x - (alpha_next * std::expm1(-h)) * d;
    x0_prev = x0;
    h_prev = h;
  }
  return x;
}

at::Tensor ddim_sample(const Denoise& denoise, at::Tensor noise, const std::vector<double>& alphas_cumprod,
                       int64_t steps, bool clip) {
  const std::vector<int64_t> kept = kept_timesteps(steps, static_cast<int64_t>(alphas_cumprod.size()), true);
  // The respaced schedule's own tables (its alphas_cumprod rebuilt from its betas), as
  // dit.diffusion computes them: in float64, each value cast to float32.
  const Respaced r = respace(kept, alphas_cumprod);
  const int64_t channels = noise.size(1);
  at::Tensor x = std::move(noise);
  for (int64_t i = static_cast<int64_t>(kept.size()) - 1; i >= 0; --i) {
    const double abar = r.abar[i];
    const auto recip = static_cast<float>(std::sqrt(1.0 / abar));
    const auto recipm1 = static_cast<float>(std::sqrt(1.0 / abar - 1.0));
    const auto abar_prev = static_cast<float>(r.abar_prev[i]);
    const at::Tensor t = at::full({x.size(0)}, static_cast<float>(kept[i]), x.options());
    const at::Tensor eps = denoise(x, t).narrow(1, 0, channels);
    at::Tensor x0 = recip * x - recipm1 * eps;
    if (clip) x0 = x0.clamp(-1, 1);
    const at::Tensor eps_x0 = (recip * x - x0) / recipm1;
    x = std::sqrt(abar_prev) * x0 + std::sqrt(1.0f - abar_prev) * eps_x0;
  }
  return x;
}

at::Tensor ddpm_sample(const Denoise& denoise, at::Tensor noise, const std::vector<double>& alphas_cumprod,
                       int64_t steps, bool clip, bool learn_sigma, const std::function<at::Tensor()>& step_noise) {
  const std::vector<int64_t> kept = kept_timesteps(steps, static_cast<int64_t>(alphas_cumprod.size()), false);
  const auto n = static_cast<int64_t>(kept.size());
  const auto [betas, abar, abar_prev] = respace(kept, alphas_cumprod);
  std::vector<double> posterior_variance(n);
  for (int64_t i = 0; i < n; ++i) posterior_variance[i] = betas[i] * (1.0 - abar_prev[i]) / (1.0 - abar[i]);
  const int64_t channels = noise.size(1);
  at::Tensor x = std::move(noise);
  for (int64_t i = n - 1; i >= 0; --i) {
    // posterior_variance[0] is 0: its log borrows posterior_variance[1], as in Python.
    const auto posterior_log_variance = static_cast<float>(std::log(posterior_variance[n > 1 && i == 0 ? 1 : i]));
    const auto log_beta = static_cast<float>(std::log(betas[i]));
    const auto coef1 = static_cast<float>(betas[i] * std::sqrt(abar_prev[i]) / (1.0 - abar[i]));
    const auto coef2 = static_cast<float>((1.0 - abar_prev[i]) * std::sqrt(1.0 - betas[i]) / (1.0 - abar[i]));
    const at::Tensor t = at::full({x.size(0)}, static_cast<float>(kept[i]), x.options());
    const at::Tensor out = denoise(x, t);
    const at::Tensor x0 = predict_x0(x, out.narrow(1, 0, channels), abar[i], clip);
    const at::Tensor mean = coef1 * x0 + coef2 * x;
    if (i == 0) return mean;
    at::Tensor logvar = at::full_like(x, posterior_log_variance);
    if (learn_sigma) {
      const at::Tensor frac = (out.narrow(1, channels, channels) + 1) / 2;
      logvar = frac * log_beta + (1 - frac) * posterior_log_variance;
    }
    x = mean + at::exp(0.5 * logvar) * step_noise();
  }
  return x;
}

at::Tensor flow_sample(const Denoise& denoise, at::Tensor noise, int64_t steps, bool heun, double time_shift) {
  if (steps < 1) {
    throw std::invalid_argument(std::string(heun ? "heun" : "euler") + " sampling takes 1 or more steps, got " +
                                std::to_string(steps));
  }
  const int64_t channels = noise.size(1);
  at::Tensor z = std::move(noise);
  const at::Tensor even = at::linspace(1.0, 0.0, steps + 1, z.options());
  // dit.diffusion.rectified_flow.shifted_times, operation for operation.
  const at::Tensor times = time_shift * even / (1 + (time_shift - 1) * even);
  const auto velocity = [&](const at::Tensor& at_z, const at::Tensor& time) {
    return denoise(at_z, time.expand({at_z.size(0)}) * kTimeScale).narrow(1, 0, channels);
  };
  for (int64_t i = 0; i < steps; ++i) {
    const at::Tensor dt = times[i + 1] - times[i];
    at::Tensor v = velocity(z, times[i]);
    if (heun) v = (v + velocity(z + dt * v, times[i + 1])) / 2;
    z = z + dt * v;
  }
  return z;
}

}  // namespace dit
