// The outputs of correlate: neurons.csv, summary.json and report.html (inline SVG).
#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "univ/analysis.hpp"

namespace univ {

struct ReportInput {
  const Analysis* analysis = nullptr;
  nlohmann::json models;        // per model: path, seed, step, config
  std::string site;             // pre or post
  nlohmann::json data;          // the held-out tokens
  std::vector<double> loss;     // each model's loss on them (empty when unknown)
  nlohmann::json timings;       // seconds per phase
};

nlohmann::json summary_json(const ReportInput& input);
std::string neurons_csv(const Analysis& analysis);
std::string report_html(const ReportInput& input);

// Writes the three files into dir (created if needed), each atomically.
// UserError when dir exists as a file or cannot be written.
void write_report(const std::filesystem::path& dir, const ReportInput& input);

}  // namespace univ
