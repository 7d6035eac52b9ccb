// The samplers of dit.sampling, in C++: DDPM and DDIM (eta = 0) for diffusion models, Euler for
// rectified flow, driven by a network evaluation and the schedule a dit.export package carries.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace dit {

// What a package's metadata says about its network and schedule.
struct PackageInfo {
  std::string objective;               // "diffusion" or "rectified-flow"
  std::vector<double> alphas_cumprod;  // diffusion: the 1000-step schedule
  std::string device;                  // where the package runs: "cpu" or "cuda"
  int64_t batch = 0, in_channels = 0, input_size = 0, num_classes = 0;
  bool cfg = false, latent = false, learn_sigma = false;
};

// `text` as a whole number (every character used), or nothing.
std::optional<int64_t> whole_integer(const std::string& text);
std::optional<double> whole_number(const std::string& text);

// Reads the metadata of a dit.export package; throws std::invalid_argument if it is not one.
PackageInfo read_package_info(const std::unordered_map<std::string, std::string>& metadata);

// One network evaluation: (x [B, C, H, W], model timesteps t [B]) -> output [B, C or 2C, H, W].
using Denoise = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;

// The steps a respaced diffusion keeps of num_timesteps (dit.diffusion.space_timesteps): `steps`
// spread evenly, first and last included; for DDIM, every i-th from 0 with the stride that gives
// exactly `steps` if one does.
std::vector<int64_t> kept_timesteps(int64_t steps, int64_t num_timesteps, bool ddim);

// Deterministic DDIM from x_T = noise; `clip` bounds the predicted x0 to [-1, 1] (pixels).
at::Tensor ddim_sample(const Denoise& denoise, at::Tensor noise, const std::vector<double>& alphas_cumprod,
                       int64_t steps, bool clip);

// Ancestral (DDPM) sampling from x_T = noise over `steps` respaced steps, with the learned
// variance when `learn_sigma`; `step_noise()` gives each step's fresh noise, shaped like x.
at::Tensor ddpm_sample(const Denoise& denoise, at::Tensor noise, const std::vector<double>& alphas_cumprod,
                       int64_t steps, bool clip, bool learn_sigma, const std::function<at::Tensor()>& step_noise);

// Euler integration of the rectified-flow velocity from t = 1 (noise) to t = 0.
at::Tensor euler_sample(const Denoise& denoise, at::Tensor noise, int64_t steps);

}  // namespace dit
