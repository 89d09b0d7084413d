// Haar-random orthogonal matrices for the rotation baseline (Mezzadri 2007): a
// Gaussian matrix, its Householder QR, and Q's columns multiplied by sign(diag R).
#pragma once
#include <cstdint>
#include <vector>

#include "univ/philox.hpp"

namespace univ {

// Householder QR of the row-major n x n matrix a: returns Q (row-major, orthogonal
// to rounding) and leaves R in the upper triangle of a.
std::vector<double> householder_qr(std::vector<double>& a, int n);

// A Haar-distributed n x n orthogonal matrix (row-major) drawn from rng.
std::vector<double> haar_orthogonal(int n, PhiloxStream& rng);

}  // namespace univ
