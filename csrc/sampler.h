// The samplers of dit.sampling, in C++: DDPM, DDIM (eta = 0) and DPM-Solver++(2M) for diffusion
// models, Euler and Heun for rectified flow, driven by a network evaluation and the schedule a
// dit.export package carries.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace dit {

constexpr int64_t kNumTimesteps = 1000;  // dit.diffusion.NUM_TIMESTEPS

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

// DPM-Solver++'s steps (dit.diffusion.space_timesteps "logsnrN"): `steps` even in half-log-SNR
// log(alpha / sigma) from the first to the last, each the nearest original step, moved up where
// two would coincide.
std::vector<int64_t> logsnr_timesteps(int64_t steps, const std::vector<double>& alphas_cumprod);

// Deterministic DDIM from x_T = noise; `clip` bounds the predicted x0 to [-1, 1] (pixels).
at::Tensor ddim_sample(const Denoise& denoise, at::Tensor noise, const std::vector<double>& alphas_cumprod,
                       int64_t steps, bool clip);

// Ancestral (DDPM) sampling from x_T = noise over `steps` respaced steps, with the learned
// variance when `learn_sigma`; `step_noise()` gives each step's fresh noise, shaped like x.
at::Tensor ddpm_sample(const Denoise& denoise, at::Tensor noise, const std::vector<double>& alphas_cumprod,
                       int64_t steps, bool clip, bool learn_sigma, const std::function<at::Tensor()>& step_noise);

// DPM-Solver++(2M) on logsnr_timesteps: data prediction, second order from the previous step,
// the last step (to the data) first order (dit.diffusion.GaussianDiffusion.dpm_solver_sample_loop).
at::Tensor dpm_solver_sample(const Denoise& denoise, at::Tensor noise, const std::vector<double>& alphas_cumprod,
                             int64_t steps, bool clip);

// Integration of the rectified-flow velocity from t = 1 (noise) to t = 0: Euler, or with `heun`
// Heun's second-order method; `time_shift` s moves the steps, t -> s t / (1 + (s - 1) t).
at::Tensor flow_sample(const Denoise& denoise, at::Tensor noise, int64_t steps, bool heun, double time_shift);

}  // namespace dit
