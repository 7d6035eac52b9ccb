// dit_sample: draw samples from a DiT-MoE exported by `python -m dit.export`, without Python.
//
//   dit_sample --package model.pt2 --out samples.npz [--num-samples 16] [--class C] [--seed 0]
//              [--steps 50] [--cfg-scale 4] [--sampler ddim|euler]
//
// Writes what `python -m dit.sample` writes: arr_0 uint8 [N, H, W, C], arr_1 int64 labels. With
// the same seed, labels, steps and guidance, it starts from the same noise (torch's CPU
// generator, as dit.sample draws it) and takes the same deterministic steps.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>

#include "npz.h"
#include "sampler.h"

namespace {

struct Options {
  std::string package, out, sampler;
  int64_t num_samples = 16, seed = 0, steps = 50, batch = 0;
  std::optional<int64_t> class_label;
  double cfg_scale = 1.0;
};

const char* kUsage =
    "usage: dit_sample --package MODEL.pt2 --out SAMPLES.npz [--num-samples N] [--class C] [--seed S] "
    "[--steps K] [--cfg-scale G] [--sampler ddim|euler] [--batch B, checked against the package]";

int64_t to_int(const std::string& flag, const std::string& text) {
  size_t used = 0;
  const int64_t value = std::stoll(text, &used);
  if (used != text.size()) throw std::invalid_argument(flag + " expects an integer, got '" + text + "'");
  return value;
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
    given[flag] = argv[++i];
  }
  Options options;
  for (const auto& [flag, value] : given) {
    try {
      if (flag == "--package") options.package = value;
      else if (flag == "--out") options.out = value;
      else if (flag == "--sampler") options.sampler = value;
      else if (flag == "--num-samples") options.num_samples = to_int(flag, value);
      else if (flag == "--class") options.class_label = to_int(flag, value);
      else if (flag == "--seed") options.seed = to_int(flag, value);
      else if (flag == "--steps") options.steps = to_int(flag, value);
      else if (flag == "--batch") options.batch = to_int(flag, value);
      else if (flag == "--cfg-scale") options.cfg_scale = std::stod(value);
      else throw std::invalid_argument("unknown flag " + flag);
    } catch (const std::logic_error& error) {
      // Our own messages name the flag; stoll and stod say only "stoll" or "stod".
      if (std::string(error.what()).find(flag) != std::string::npos) throw std::invalid_argument(error.what());
      throw std::invalid_argument(flag + ": bad value '" + value + "'");
    }
  }
  if (options.package.empty() || options.out.empty()) throw std::invalid_argument("--package and --out are required");
  if (options.num_samples < 1) throw std::invalid_argument("--num-samples must be >= 1");
  if (!(options.cfg_scale >= 0)) throw std::invalid_argument("--cfg-scale must be >= 0");
  return options;
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
    const std::string sampler = options.sampler.empty() ? (info.objective == "diffusion" ? "ddim" : "euler") : options.sampler;
    if ((sampler == "euler") != (info.objective == "rectified-flow") || (sampler != "ddim" && sampler != "euler")) {
      throw std::invalid_argument("--sampler " + sampler + " does not fit a model trained with the " + info.objective +
                                  " objective (ddim for diffusion, euler for rectified-flow)");
    }
    if (options.class_label && (*options.class_label < 0 || *options.class_label >= info.num_classes)) {
      throw std::invalid_argument("--class must be in [0, " + std::to_string(info.num_classes) + "), got " +
                                  std::to_string(*options.class_label));
    }
    if (options.cfg_scale != 1.0 && !info.cfg) {
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
    const at::Tensor scale = at::full({1}, options.cfg_scale, floats);
    int64_t evaluations = 0;
    double network_ms = 0;

    const at::Tensor all_labels = options.class_label
        ? at::full({options.num_samples}, *options.class_label, at::kLong)
        : at::arange(options.num_samples, at::kLong).remainder(info.num_classes);
    auto generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
    std::vector<at::Tensor> images;
    const auto start = std::chrono::steady_clock::now();
    for (int64_t first = 0; first < options.num_samples; first += info.batch) {
      const int64_t n = std::min(info.batch, options.num_samples - first);
      // dit.sample's noise: one draw per chunk from the seeded CPU generator; padded to the batch.
      at::Tensor noise = at::randn({n, info.in_channels, info.input_size, info.input_size}, generator);
      at::Tensor labels = all_labels.slice(0, first, first + n);
      if (n < info.batch) {
        noise = at::cat({noise, at::zeros({info.batch - n, info.in_channels, info.input_size, info.input_size})});
        labels = at::cat({labels, at::zeros({info.batch - n}, at::kLong)});
      }
      const at::Tensor y = labels.to(device);
      const dit::Denoise evaluate = [&](const at::Tensor& x, const at::Tensor& t) {
        const auto begin = std::chrono::steady_clock::now();
        at::Tensor out = loader.run({x, t, y, scale})[0];
        network_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - begin).count();
        ++evaluations;
        return out;
      };
      const at::Tensor x = sampler == "ddim"
          ? dit::ddim_sample(evaluate, noise.to(device), info.alphas_cumprod, options.steps, /*clip=*/true)
          : dit::euler_sample(evaluate, noise.to(device), options.steps);
      images.push_back(x.narrow(0, 0, n).cpu());
    }
    const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const at::Tensor pixels =
        ((at::cat(images) + 1) * 127.5).round().clamp(0, 255).to(at::kByte).permute({0, 2, 3, 1}).contiguous();
    dit::write_npz(options.out, {{"arr_0", pixels}, {"arr_1", all_labels}});
    std::cerr << "wrote " << options.num_samples << " samples to " << options.out << " (" << sampler << ", "
              << options.steps << " steps, cfg " << options.cfg_scale << ") in " << total_s << " s; "
              << (evaluations ? network_ms / evaluations : 0.0) << " ms per network evaluation of batch "
              << info.batch << " on " << info.device << ", "
              << (evaluations ? total_s * 1e3 / evaluations : 0.0) << " ms per step with the sampler's arithmetic\n";
    return 0;
  } catch (const std::invalid_argument& error) {
    std::cerr << "error: " << error.what() << "\n" << kUsage << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
}
