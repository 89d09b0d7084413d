// MPI sessions: started by mpirun or a single process; statistics gathered at rank 0.
#include "univ/mpi.hpp"

#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#ifdef UNIV_HAVE_MPI
#include <mpi.h>
#endif

namespace univ {

namespace {

// mpirun (Open MPI, MPICH, PMIx launchers) leaves its mark in the environment.
bool started_by_mpirun() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (std::getenv(name)) return true;
  return false;
}

#ifdef UNIV_HAVE_MPI
constexpr size_t kPiece = size_t(1) << 30;  // MPI counts are ints: big messages go in pieces

void check(int rc, const char* call) {
  if (rc != MPI_SUCCESS) throw std::runtime_error(std::string(call) + " failed");
}

void send_bytes(const std::string& bytes, int to) {
  const uint64_t size = bytes.size();
  check(MPI_Send(&size, 1, MPI_UINT64_T, to, 0, MPI_COMM_WORLD), "MPI_Send");
  for (size_t at = 0; at < bytes.size(); at += kPiece)
    check(MPI_Send(bytes.data() + at, static_cast<int>(std::min(kPiece, bytes.size() - at)), MPI_BYTE, to, 1,
                   MPI_COMM_WORLD),
          "MPI_Send");
}

std::string receive_bytes(int from) {
  uint64_t size = 0;
  check(MPI_Recv(&size, 1, MPI_UINT64_T, from, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Recv");
  std::string bytes(size, '\0');
  for (size_t at = 0; at < bytes.size(); at += kPiece)
    check(MPI_Recv(bytes.data() + at, static_cast<int>(std::min(kPiece, bytes.size() - at)), MPI_BYTE, from, 1,
                   MPI_COMM_WORLD, MPI_STATUS_IGNORE),
          "MPI_Recv");
  return bytes;
}
#endif

}  // namespace

MpiSession::MpiSession(int& argc, char**& argv) {
#ifdef UNIV_HAVE_MPI
  if (!started_by_mpirun()) return;
  check(MPI_Init(&argc, &argv), "MPI_Init");
  initialized_ = true;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
#else
  (void)argc;
  (void)argv;
  (void)started_by_mpirun;
#endif
}

MpiSession::~MpiSession() {
#ifdef UNIV_HAVE_MPI
  if (initialized_) MPI_Finalize();
#endif
}

CorrelationStats MpiSession::gather_stats(const CorrelationStats& local) const {
  if (size_ == 1) return local;
#ifdef UNIV_HAVE_MPI
  if (!root()) {
    send_bytes(local.bytes({}), 0);
    return local;
  }
  CorrelationStats merged = local;
  for (int r = 1; r < size_; ++r)
    merged.merge(CorrelationStats::parse(receive_bytes(r), "statistics of rank " + std::to_string(r), nullptr));
  return merged;
#else
  return local;
#endif
}

std::vector<double> MpiSession::sum(const std::vector<double>& local) const {
  if (size_ == 1) return local;
#ifdef UNIV_HAVE_MPI
  std::vector<double> total(local.size(), 0.0);
  check(MPI_Reduce(local.data(), total.data(), static_cast<int>(local.size()), MPI_DOUBLE, MPI_SUM, 0,
                   MPI_COMM_WORLD),
        "MPI_Reduce");
  return total;
#else
  return local;
#endif
}

void MpiSession::abort(int code) const {
#ifdef UNIV_HAVE_MPI
  if (initialized_) MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::exit(code);
}

}  // namespace univ
