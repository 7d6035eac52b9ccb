// Writing NumPy .npz archives: what np.savez writes (uncompressed zip of .npy files).
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace dit {

// Writes `arrays` (name, contiguous CPU tensor of uint8 or int64) to `path` as name.npy entries;
// throws std::runtime_error when the file cannot be written.
void write_npz(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& arrays);

}  // namespace dit
