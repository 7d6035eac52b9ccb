// dit_sample: draw samples from a DiT-MoE exported by `python -m dit.export`, without Python.
//
//   dit_sample --package model.pt2 --out samples.npz [--num-samples 100] [--class C] [--seed 0]
//              [--steps 250] [--cfg-scale 4] [--sampler ddpm|ddim|dpm++2m|euler|heun]
//              [--cfg-interval LO HI] [--time-shift S]
//
// Writes what `python -m dit.sample` writes: arr_0 uint8 [N, H, W, C], arr_1 int64 labels, with
// its defaults. With the same seed, labels, sampler, steps and guidance, it draws the same noise
// (torch's CPU generator, one per sample, seeded from the seed and the sample's index, as
// dit.sample draws it) and takes the same steps.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

#include "npz.h"
#include "sampler.h"

namespace {

struct Options {
  std::string package, out, sampler;
  int64_t num_samples = 100, seed = 0, batch = 0;
  std::optional<int64_t> steps, class_label;
  std::optional<double> cfg_scale;
  std::optional<std::pair<double, double>> cfg_interval;
  double time_shift = 1.0;
};

// dit.sampling: the samplers of each objective, the first the default, with their default steps.
const std::map<std::string, std::pair<std::string, int64_t>> kSamplers = {
    {"ddpm", {"diffusion", 250}}, {"ddim", {"diffusion", 250}}, {"dpm++2m", {"diffusion", 20}},
    {"euler", {"rectified-flow", 50}}, {"heun", {"rectified-flow", 25}}};

// The defaults are dit.sample's; those that depend on the package say how.
const char* kUsage =
    "usage: dit_sample --package MODEL.pt2 --out SAMPLES.npz [--num-samples N (100)] [--class C (all, in turn)]\n"
    "                  [--seed S (0)] [--sampler ddpm|ddim|dpm++2m (ddpm) for diffusion, euler|heun (euler) for\n"
    "                  rectified flow] [--steps K (ddpm, ddim 250; dpm++2m 20; euler 50; heun 25)]\n"
    "                  [--cfg-scale G (4; 1 for a package exported without --cfg)] [--cfg-interval LO HI (all)]\n"
    "                  [--time-shift S (1; rectified flow)] [--batch B (checked against the package)]";

// The number rules of the Python command lines (moe_kernels.rules): a seed in [0, 2**32),
// guidance a finite number in [0, 1e6], counts >= 1, a class >= 0.
int64_t to_int(const std::string& flag, const std::string& text, int64_t low, int64_t high) {
  const std::optional<int64_t> value = dit::whole_integer(text);
  if (!value || *value < low || *value > high) {
    throw std::invalid_argument(flag + " expects an integer in [" + std::to_string(low) + ", " +
                                (high == INT64_MAX ? std::string("inf") : std::to_string(high)) + "], got '" + text + "'");
  }
  return *value;
}

// A finite number in [low, high] (the interval open at `low` if `open_low`).
double to_number(const std::string& flag, const std::string& text, double low, double high, bool open_low = false) {
  const std::optional<double> value = dit::whole_number(text);
  if (!value || !std::isfinite(*value) || *value < low || (open_low && *value == low) || *value > high) {
    std::ostringstream wanted;
    wanted << (open_low ? "(" : "[") << low << ", " << high << "]";
    throw std::invalid_argument(flag + " expects a finite number in " + wanted.str() + ", got '" + text + "'");
  }
  return *value;
}

Options parse(int argc, char** argv) {
  std::map<std::string, std::string> given;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::cout << kUsage << "\n";
      std::exit(0);
    }
    if (flag.rfind("--", 0) != 0 || i + 1 >= argc) throw std::invalid_argument("unexpected argument '" + flag + "'");
    if (flag == "--cfg-interval") {  // the one flag of two values
      if (i + 2 >= argc) throw std::invalid_argument("--cfg-interval expects two numbers, LO HI");
      given[flag] = argv[i + 1];
      given["--cfg-interval HI"] = argv[i + 2];
      i += 2;
      continue;
    }
    given[flag] = argv[++i];
  }
  Options options;
  for (const auto& [flag, value] : given) {
    if (flag == "--package") options.package = value;
    else if (flag == "--out") options.out = value;
    else if (flag == "--sampler") options.sampler = value;
    else if (flag == "--num-samples") options.num_samples = to_int(flag, value, 1, INT64_MAX);
    else if (flag == "--class") options.class_label = to_int(flag, value, 0, INT64_MAX);
    else if (flag == "--seed") options.seed = to_int(flag, value, 0, (int64_t{1} << 32) - 1);
    else if (flag == "--steps") options.steps = to_int(flag, value, 1, INT64_MAX);
    else if (flag == "--batch") options.batch = to_int(flag, value, 1, INT64_MAX);
    else if (flag == "--cfg-scale") options.cfg_scale = to_number(flag, value, 0, 1e6);
    else if (flag == "--time-shift") options.time_shift = to_number(flag, value, 0, 1e6, /*open_low=*/true);
    else if (flag == "--cfg-interval") {
      options.cfg_interval = {to_number(flag, value, 0, 1), to_number(flag, given.at("--cfg-interval HI"), 0, 1)};
      if (options.cfg_interval->first > options.cfg_interval->second) {
        throw std::invalid_argument("--cfg-interval expects LO <= HI, got " + value + " " + given.at("--cfg-interval HI"));
      }
    } else if (flag != "--cfg-interval HI") throw std::invalid_argument("unknown flag " + flag);
  }
  if (options.package.empty() || options.out.empty()) throw std::invalid_argument("--package and --out are required");
  if (!options.sampler.empty() && kSamplers.find(options.sampler) == kSamplers.end()) {
    throw std::invalid_argument("--sampler must be ddpm, ddim, dpm++2m, euler or heun, got '" + options.sampler + "'");
  }
  return options;
}

// One line: a c10::Error's message without the C++ backtrace torch appends, and of any other
// message its first line.
std::string one_line(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  std::string text = c10_error ? c10_error->what_without_backtrace() : error.what();
  return text.substr(0, text.find('\n'));
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options options = parse(argc, argv);
    if (!std::filesystem::is_regular_file(options.package)) {
      throw std::invalid_argument("--package " + options.package + ": no such file (write one with python -m dit.export)");
    }
    const auto out_dir = std::filesystem::absolute(options.out).parent_path();
    if (!std::filesystem::is_directory(out_dir)) throw std::invalid_argument("--out " + options.out + ": no such directory");

    std::unordered_map<std::string, std::string> metadata;
    try {
      metadata = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(options.package, "model");
    } catch (const std::exception&) {
      throw std::invalid_argument("--package " + options.package + " is not an AOTInductor package");
    }
    const dit::PackageInfo info = dit::read_package_info(metadata);
    const bool flow = info.objective == "rectified-flow";
    const std::string sampler = options.sampler.empty() ? (flow ? "euler" : "ddpm") : options.sampler;
    if (kSamplers.at(sampler).first != info.objective) {
      throw std::invalid_argument("--sampler " + sampler + " does not fit a model trained with the " + info.objective +
                                  " objective (ddpm, ddim or dpm++2m for diffusion, euler or heun for rectified-flow)");
    }
    if (options.time_shift != 1.0 && !flow) {
      throw std::invalid_argument("--time-shift applies to rectified-flow models; this one was trained with diffusion");
    }
    const int64_t steps = options.steps.value_or(kSamplers.at(sampler).second);
    if (sampler == "dpm++2m") dit::logsnr_timesteps(steps, info.alphas_cumprod);
    else if (!flow) dit::kept_timesteps(steps, static_cast<int64_t>(info.alphas_cumprod.size()), sampler == "ddim");
    if (options.class_label && *options.class_label >= info.num_classes) {
      throw std::invalid_argument("--class must be in [0, " + std::to_string(info.num_classes) + "), got " +
                                  std::to_string(*options.class_label));
    }
    const double cfg_scale = options.cfg_scale.value_or(info.cfg ? 4.0 : 1.0);
    if (cfg_scale != 1.0 && !info.cfg) {
      throw std::invalid_argument("--cfg-scale needs a package exported with --cfg");
    }
    if (options.batch && options.batch != info.batch) {
      throw std::invalid_argument("--batch " + std::to_string(options.batch) + ": the package was exported for batch " +
                                  std::to_string(info.batch) + " (python -m dit.export --batch)");
    }
    if (info.latent) throw std::invalid_argument("the model makes VAE latents; dit_sample writes pixel models' images only");
    if (info.device == "cuda" && !at::hasCUDA()) throw std::invalid_argument("the package was exported for CUDA");

    torch::inductor::AOTIModelPackageLoader loader(options.package);
    const at::Device device(info.device);
    const auto floats = at::TensorOptions().dtype(at::kFloat).device(device);
    const at::Tensor scale = at::full({1}, cfg_scale, floats);
    const at::Tensor unguided = at::ones({1}, floats);
    int64_t evaluations = 0;
    double network_ms = 0;

    const at::Tensor all_labels = options.class_label
        ? at::full({options.num_samples}, *options.class_label, at::kLong)
        : at::arange(options.num_samples, at::kLong).remainder(info.num_classes);
    const auto shape = [&](int64_t rows) {
      return std::vector<int64_t>{rows, info.in_channels, info.input_size, info.input_size};
    };
    std::vector<at::Tensor> images;
    const auto start = std::chrono::steady_clock::now();
    for (int64_t first = 0; first < options.num_samples; first += info.batch) {
      const int64_t n = std::min(info.batch, options.num_samples - first);
      at::Tensor labels = all_labels.slice(0, first, first + n);
      if (n < info.batch) labels = at::cat({labels, at::zeros({info.batch - n}, at::kLong)});
      const at::Tensor y = labels.to(device);
      const auto pad = [&](const at::Tensor& rows) {
        return n < info.batch ? at::cat({rows, at::zeros(shape(info.batch - n), rows.options())}) : rows;
      };
      // dit.sampling.SampleNoise: sample i's draws (its starting noise, then DDPM's steps') come
      // from its own CPU generator, seeded (seed * 0x9E3779B9 + i) mod 2**32 (dit.parallel.stream_seed);
      // padded to the batch, on the device.
      std::vector<at::Generator> generators;
      for (int64_t i = first; i < first + n; ++i) {
        const uint32_t seed = static_cast<uint32_t>(options.seed) * 0x9E3779B9u + static_cast<uint32_t>(i);
        generators.push_back(at::make_generator<at::CPUGeneratorImpl>(seed));
      }
      const auto draw = [&] {
        std::vector<at::Tensor> rows;
        for (at::Generator& generator : generators) {
          rows.push_back(at::randn({info.in_channels, info.input_size, info.input_size}, generator));
        }
        return pad(at::stack(rows)).to(device);
      };
      const at::Tensor noise = draw();
      const dit::Denoise evaluate = [&](const at::Tensor& x, const at::Tensor& t) {
        const auto begin = std::chrono::steady_clock::now();
        // dit.sampling.guided: guidance only while t / 1000 lies in the interval, chosen on the
        // device (the scale is the package's input), the conditional prediction elsewhere.
        at::Tensor step_scale = scale;
        if (options.cfg_interval) {
          const at::Tensor time = t.narrow(0, 0, 1).to(at::kFloat) / static_cast<double>(dit::kNumTimesteps);
          step_scale = at::where((time >= options.cfg_interval->first) & (time <= options.cfg_interval->second),
                                 scale, unguided);
        }
        // The package reads its inputs as dense tensors: an expanded view (stride 0) would hand
        // it one value and the memory past it.
        at::Tensor out = loader.run({x.contiguous(), t.contiguous(), y, step_scale})[0];
        network_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - begin).count();
        ++evaluations;
        return out;
      };
      at::Tensor x;
      if (sampler == "ddpm") {
        x = dit::ddpm_sample(evaluate, noise, info.alphas_cumprod, steps, /*clip=*/true, info.learn_sigma, draw);
      } else if (sampler == "ddim") {
        x = dit::ddim_sample(evaluate, noise, info.alphas_cumprod, steps, /*clip=*/true);
      } else if (sampler == "dpm++2m") {
        x = dit::dpm_solver_sample(evaluate, noise, info.alphas_cumprod, steps, /*clip=*/true);
      } else {
        x = dit::flow_sample(evaluate, noise, steps, sampler == "heun", options.time_shift);
      }
      images.push_back(x.narrow(0, 0, n).cpu());
    }
    const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const at::Tensor pixels =
        ((at::cat(images) + 1) * 127.5).round().clamp(0, 255).to(at::kByte).permute({0, 2, 3, 1}).contiguous();
    dit::write_npz(options.out, {{"arr_0", pixels}, {"arr_1", all_labels}});
    std::cerr << "wrote " << options.num_samples << " samples to " << options.out << " (" << sampler << ", "
              << steps << " steps, cfg " << cfg_scale << ") in " << total_s << " s; "
              << (evaluations ? network_ms / evaluations : 0.0) << " ms per network evaluation of batch "
              << info.batch << " on " << info.device << ", "
              << (evaluations ? total_s * 1e3 / evaluations : 0.0) << " ms per step with the sampler's arithmetic\n";
    return 0;
  } catch (const std::invalid_argument& error) {
    std::cerr << "error: " << one_line(error) << "\n" << kUsage << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "error: " << one_line(error) << "\n";
    return 1;
  }
}
