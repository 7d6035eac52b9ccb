#include "npz.h"

#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <stdexcept>

namespace dit {
namespace {

std::string npy(const at::Tensor& array) {
  std::string descr;
  if (array.scalar_type() == at::kByte) descr = "|u1";
  else if (array.scalar_type() == at::kLong) descr = "<i8";
  else throw std::runtime_error("write_npz: only uint8 and int64 arrays are supported");
  std::string shape = "(";
  for (int64_t size : array.sizes()) shape += std::to_string(size) + ", ";
  if (array.dim() > 1) shape.resize(shape.size() - 1);  // (N, H, W, C) but (N,)
  shape += ")";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Magic (6) + version (2) + length (2) + header + newline, padded to a multiple of 64.
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(static_cast<const char*>(array.data_ptr()), array.nbytes());
  return out;
}

void put16(std::string& s, uint16_t v) { s += static_cast<char>(v & 0xff); s += static_cast<char>(v >> 8); }
void put32(std::string& s, uint32_t v) { put16(s, v & 0xffff); put16(s, v >> 16); }

}  // namespace

void write_npz(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& arrays) {
  std::string archive, directory;
  for (const auto& [name, tensor] : arrays) {
    const std::string file = name + ".npy", data = npy(tensor.contiguous());
    const uint32_t crc = crc32(0, reinterpret_cast<const Bytef*>(data.data()), data.size());
    const uint32_t offset = archive.size();
    // Local header: stored (no compression), sizes known up front, no timestamps.
    put32(archive, 0x04034b50); put16(archive, 20); put16(archive, 0); put16(archive, 0);
    put16(archive, 0); put16(archive, 0x21);  // time 0, date 1980-01-01
    put32(archive, crc); put32(archive, data.size()); put32(archive, data.size());
    put16(archive, file.size()); put16(archive, 0);
    archive += file + data;
    put32(directory, 0x02014b50); put16(directory, 20); put16(directory, 20); put16(directory, 0); put16(directory, 0);
    put16(directory, 0); put16(directory, 0x21);
    put32(directory, crc); put32(directory, data.size()); put32(directory, data.size());
    put16(directory, file.size()); put16(directory, 0); put16(directory, 0); put16(directory, 0); put16(directory, 0);
    put32(directory, 0); put32(directory, offset);
    directory += file;
  }
  const uint32_t directory_offset = archive.size();
  archive += directory;
  put32(archive, 0x06054b50); put16(archive, 0); put16(archive, 0);
  put16(archive, arrays.size()); put16(archive, arrays.size());
  put32(archive, directory.size()); put32(archive, directory_offset); put16(archive, 0);
  // Written beside the target, then renamed onto it: a failure never leaves half a file.
  const std::string tmp = path + ".tmp";
  std::ofstream stream(tmp, std::ios::binary);
  stream.write(archive.data(), archive.size());
  stream.close();
  if (!stream || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot write " + path);
  }
}

}  // namespace dit
