#include "sampler.h"

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace dit {
namespace {

const std::string& field(const std::unordered_map<std::string, std::string>& metadata, const std::string& key) {
  const auto found = metadata.find(key);
  if (found == metadata.end()) throw std::invalid_argument("the package's metadata has no '" + key + "'");
  return found->second;
}

int64_t integer(const std::unordered_map<std::string, std::string>& metadata, const std::string& key) {
  return std::stoll(field(metadata, key));
}

constexpr double kTimeScale = 1000.0;  // dit.diffusion.rectified_flow.TIME_SCALE

}  // namespace

PackageInfo read_package_info(const std::unordered_map<std::string, std::string>& metadata) {
  if (metadata.find("format") == metadata.end() || metadata.at("format") != "dit-moe-denoiser/1") {
    throw std::invalid_argument("not a package written by python -m dit.export");
  }
  PackageInfo info;
  info.objective = field(metadata, "objective");
  info.device = field(metadata, "device");
  info.batch = integer(metadata, "batch");
  info.in_channels = integer(metadata, "in_channels");
  info.input_size = integer(metadata, "input_size");
  info.num_classes = integer(metadata, "num_classes");
  info.cfg = integer(metadata, "cfg") != 0;
  info.latent = integer(metadata, "latent") != 0;
  if (info.objective == "diffusion") {
    std::stringstream values(field(metadata, "alphas_cumprod"));
    for (std::string value; std::getline(values, value, ',');) info.alphas_cumprod.push_back(std::stod(value));
  }
  return info;
}

std::vector<int64_t> ddim_timesteps(int64_t steps, int64_t num_timesteps) {
  if (steps < 2 || steps > num_timesteps) {
    throw std::invalid_argument("ddim sampling takes 2 to " + std::to_string(num_timesteps) + " steps, got " +
                                std::to_string(steps));
  }
  std::vector<int64_t> kept;
  for (int64_t stride = 1; stride < num_timesteps; ++stride) {
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

at::Tensor ddim_sample(const Denoise& denoise, at::Tensor noise, const std::vector<double>& alphas_cumprod,
                       int64_t steps, bool clip) {
  const std::vector<int64_t> kept = ddim_timesteps(steps, static_cast<int64_t>(alphas_cumprod.size()));
  const int64_t channels = noise.size(1);
  at::Tensor x = std::move(noise);
  for (int64_t i = static_cast<int64_t>(kept.size()) - 1; i >= 0; --i) {
    // As dit.diffusion computes them: the tables in float64, each value cast to float32.
    const double abar = alphas_cumprod[kept[i]];
    const auto recip = static_cast<float>(std::sqrt(1.0 / abar));
    const auto recipm1 = static_cast<float>(std::sqrt(1.0 / abar - 1.0));
    const auto abar_prev = static_cast<float>(i > 0 ? alphas_cumprod[kept[i - 1]] : 1.0);
    const at::Tensor t = at::full({x.size(0)}, static_cast<float>(kept[i]), x.options());
    const at::Tensor eps = denoise(x, t).narrow(1, 0, channels);
    at::Tensor x0 = recip * x - recipm1 * eps;
    if (clip) x0 = x0.clamp(-1, 1);
    const at::Tensor eps_x0 = (recip * x - x0) / recipm1;
    x = std::sqrt(abar_prev) * x0 + std::sqrt(1.0f - abar_prev) * eps_x0;
  }
  return x;
}

at::Tensor euler_sample(const Denoise& denoise, at::Tensor noise, int64_t steps) {
  if (steps < 1) throw std::invalid_argument("euler sampling takes 1 or more steps, got " + std::to_string(steps));
  const int64_t channels = noise.size(1);
  at::Tensor z = std::move(noise);
  const at::Tensor times = at::linspace(1.0, 0.0, steps + 1, z.options());
  for (int64_t i = 0; i < steps; ++i) {
    const at::Tensor t = times[i].expand({z.size(0)});
    const at::Tensor velocity = denoise(z, t * kTimeScale).narrow(1, 0, channels);
    z = z + (times[i + 1] - times[i]) * velocity;
  }
  return z;
}

}  // namespace dit
