// The processes of an `mpirun -n P` launch. Each rank streams its slice of the
// tokens; the statistics meet at rank 0, merged in rank order. Without MPI in the
// build, or when not started by mpirun, this is the one process.
#pragma once
#include <string>
#include <vector>

#include "univ/stats.hpp"

namespace univ {

class MpiSession {
 public:
  MpiSession(int& argc, char**& argv);  // MPI_Init only when started by mpirun
  ~MpiSession();                        // MPI_Finalize
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool root() const { return rank_ == 0; }
  // Every rank's statistics merged at rank 0 in rank order (the other ranks get their own back).
  CorrelationStats gather_stats(const CorrelationStats& local) const;
  // Element-wise sums over ranks, valid at rank 0.
  std::vector<double> sum(const std::vector<double>& local) const;
  // Ends every rank: one rank's error must not leave the others waiting.
  [[noreturn]] void abort(int code) const;

 private:
  int rank_ = 0, size_ = 1;
  bool initialized_ = false;
};

}  // namespace univ
