// neurons.csv, summary.json and report.html with hand-written SVG plots.
#include "univ/report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "univ/error.hpp"
#include "univ/fileio.hpp"

namespace univ {

namespace fs = std::filesystem;

namespace {

nlohmann::json null_json(const NullCount& n) {
  if (!n.applies()) return nullptr;
  return {{"mean", n.mean()}, {"sd", n.sd()}, {"chance_bound", chance_bound(n)}, {"counts", n.counts}};
}

std::string fmt(const char* format, double value) {
  char text[64];
  std::snprintf(text, sizeof text, format, value);
  return text;
}

std::string escape_html(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else if (c == '"') out += "&quot;";
    else out += c;
  }
  return out;
}

constexpr const char* kGreen = "#2e9d4a";
constexpr const char* kGray = "#8a8f98";
constexpr const char* kRed = "#c8352e";

std::vector<double> round_values(double lo, double hi, int about) {
  const double raw = (hi - lo) / std::max(about, 1);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / magnitude;
  const double step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * magnitude;
  std::vector<double> out;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + 1e-9 * step; v += step)
    out.push_back(std::abs(v) < 1e-9 * step ? 0.0 : v);
  return out;
}

// A plot area with linear axes, written as SVG elements.
class SvgPlot {
 public:
  SvgPlot(double x0, double x1, double y0, double y1, const std::string& title, const std::string& xlabel,
          const std::string& ylabel)
      : x0_(x0), x1_(x1), y0_(y0), y1_(y1) {
    svg_ << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kWidth << "\" height=\"" << kHeight
         << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
    svg_ << "<text x=\"" << kWidth / 2 << "\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">" << escape_html(title)
         << "</text>\n";
    svg_ << "<text x=\"" << (kLeft + kWidth - kRight) / 2 << "\" y=\"" << kHeight - 6
         << "\" text-anchor=\"middle\">" << escape_html(xlabel) << "</text>\n";
    svg_ << "<text transform=\"translate(14," << (kTop + kHeight - kBottom) / 2
         << ") rotate(-90)\" text-anchor=\"middle\">" << escape_html(ylabel) << "</text>\n";
    svg_ << "<rect x=\"" << kLeft << "\" y=\"" << kTop << "\" width=\"" << kWidth - kLeft - kRight << "\" height=\""
         << kHeight - kTop - kBottom << "\" fill=\"none\" stroke=\"#444\"/>\n";
  }
  double px(double x) const { return kLeft + (x - x0_) / (x1_ - x0_) * (kWidth - kLeft - kRight); }
  double py(double y) const { return kHeight - kBottom - (y - y0_) / (y1_ - y0_) * (kHeight - kTop - kBottom); }
  // Ticks at round values (1, 2 or 5 times a power of ten) about `nx` and `ny` apart.
  void ticks(int nx, int ny, bool x_ticks = true) {
    if (x_ticks)
      for (double x : round_values(x0_, x1_, nx))
        svg_ << "<text x=\"" << px(x) << "\" y=\"" << kHeight - kBottom + 16 << "\" text-anchor=\"middle\">"
             << fmt("%g", x) << "</text>\n";
    for (double y : round_values(y0_, y1_, ny))
      svg_ << "<text x=\"" << kLeft - 6 << "\" y=\"" << py(y) + 4 << "\" text-anchor=\"end\">" << fmt("%g", y)
           << "</text>\n";
  }
  void circle(double x, double y, const char* color) {
    svg_ << "<circle cx=\"" << px(x) << "\" cy=\"" << py(y) << "\" r=\"2.2\" fill=\"" << color
         << "\" fill-opacity=\"0.6\"/>\n";
  }
  void line(double xa, double ya, double xb, double yb, const char* color, bool dashed = false) {
    svg_ << "<line x1=\"" << px(xa) << "\" y1=\"" << py(ya) << "\" x2=\"" << px(xb) << "\" y2=\"" << py(yb)
         << "\" stroke=\"" << color << "\" stroke-width=\"1.5\"" << (dashed ? " stroke-dasharray=\"5,4\"" : "")
         << "/>\n";
  }
  void bar(double xa, double xb, double ya, double yb, const char* color, const std::string& tooltip) {
    svg_ << "<rect x=\"" << px(xa) << "\" y=\"" << py(yb) << "\" width=\"" << std::max(0.0, px(xb) - px(xa))
         << "\" height=\"" << std::max(0.0, py(ya) - py(yb)) << "\" fill=\"" << color << "\"><title>"
         << escape_html(tooltip) << "</title></rect>\n";
  }
  void label(double x, double y, const std::string& text, const char* anchor = "middle") {
    svg_ << "<text x=\"" << px(x) << "\" y=\"" << py(y) << "\" text-anchor=\"" << anchor << "\">"
         << escape_html(text) << "</text>\n";
  }
  void legend(int row, const char* color, const std::string& text) {
    const double x = kWidth - kRight - 200, y = kTop + 14 + 16 * row;
    svg_ << "<rect x=\"" << x << "\" y=\"" << y - 9 << "\" width=\"10\" height=\"10\" fill=\"" << color << "\"/>"
         << "<text x=\"" << x + 15 << "\" y=\"" << y << "\">" << escape_html(text) << "</text>\n";
  }
  std::string finish() {
    svg_ << "</svg>\n";
    return svg_.str();
  }

 private:
  static constexpr int kWidth = 640, kHeight = 420, kLeft = 60, kRight = 20, kTop = 30, kBottom = 50;
  double x0_, x1_, y0_, y1_;
  std::ostringstream svg_;
};

std::string scatter_plot(const Analysis& a) {
  double lo = 0;
  for (const auto& nr : a.neurons)
    for (const auto& p : nr.partners) lo = std::min({lo, p.r, p.baseline});
  lo = std::floor(lo * 10) / 10;
  SvgPlot plot(lo, 1, lo, 1, "Matched correlation against its rotation baseline", "baseline r (partner rotated)",
               "r (actual partner)");
  plot.ticks(5, 5);
  plot.line(lo, lo, 1, 1, kGray);
  const double t = a.options.threshold;
  if (lo + t < 1) plot.line(lo, lo + t, 1 - t, 1, kRed, true);
  for (const auto& nr : a.neurons)
    for (const auto& p : nr.partners)
      if (!nr.universal) plot.circle(p.baseline, p.r, kGray);
  for (const auto& nr : a.neurons)  // universal neurons on top
    for (const auto& p : nr.partners)
      if (nr.universal) plot.circle(p.baseline, p.r, kGreen);
  plot.legend(0, kGreen, "universal neuron");
  plot.legend(1, kGray, "other neuron");
  plot.legend(2, kRed, "r = baseline + threshold");
  return plot.finish();
}

std::string excess_histogram(const Analysis& a) {
  const double width = 0.05, t = a.options.threshold;
  double lo = 0, hi = t + width;
  for (const auto& nr : a.neurons)
    if (!nr.dead) lo = std::min(lo, nr.excess), hi = std::max(hi, nr.excess);
  lo = std::floor(lo / width) * width;
  hi = std::ceil(hi / width) * width;
  const int bins = std::max(1, static_cast<int>(std::lround((hi - lo) / width)));
  std::vector<int> other(bins, 0), universal(bins, 0);
  for (const auto& nr : a.neurons) {
    if (nr.dead) continue;
    const int b = std::clamp(static_cast<int>((nr.excess - lo) / width), 0, bins - 1);
    (nr.universal ? universal : other)[b]++;
  }
  int top = 1;
  for (int b = 0; b < bins; ++b) top = std::max(top, other[b] + universal[b]);
  SvgPlot plot(lo, hi, 0, top * 1.1, "Excess correlation of every neuron", "excess correlation (r - baseline)",
               "neurons");
  plot.ticks(std::min(bins, 8), 4);
  for (int b = 0; b < bins; ++b) {
    const double x0 = lo + b * width, x1 = x0 + width * 0.92;
    const std::string range = fmt("%.2f", x0) + " to " + fmt("%.2f", x0 + width);
    plot.bar(x0, x1, 0, other[b], kGray, std::to_string(other[b]) + " neurons, excess " + range);
    plot.bar(x0, x1, other[b], other[b] + universal[b], kGreen,
             std::to_string(universal[b]) + " universal neurons, excess " + range);
  }
  plot.line(t, 0, t, top * 1.1, kRed, true);
  plot.legend(0, kGreen, "universal neuron");
  plot.legend(1, kGray, "other neuron");
  plot.legend(2, kRed, "threshold " + fmt("%.2f", t));
  return plot.finish();
}

std::string layer_bars(const Analysis& a) {
  const int groups = static_cast<int>(a.layers.size());
  double top = 1;
  for (const auto& ls : a.layers) {
    top = std::max(top, double(ls.universal));
    for (const NullCount* n : {&ls.rotation_null, &ls.permutation_null})
      if (n->applies()) top = std::max(top, n->mean() + n->sd());
  }
  SvgPlot plot(0, groups, 0, top * 1.15, "Universal neurons per layer against chance", "model / layer", "neurons");
  plot.ticks(1, 4, false);
  for (int g = 0; g < groups; ++g) {
    const LayerSummary& ls = a.layers[g];
    const std::string name = "model " + std::to_string(ls.model) + " layer " + std::to_string(ls.layer);
    plot.bar(g + 0.1, g + 0.37, 0, ls.universal, kGreen, name + ": " + std::to_string(ls.universal) + " universal");
    int slot = 1;
    for (const auto& [null, what] : {std::pair{&ls.rotation_null, "random rotations"},
                                     std::pair{&ls.permutation_null, "random partner permutations"}}) {
      if (!null->applies()) continue;
      const double x0 = g + 0.1 + 0.27 * slot++, x1 = x0 + 0.27;
      plot.bar(x0, x1, 0, null->mean(), slot == 2 ? kGray : "#c9ccd1",
               name + ": " + what + " flag " + fmt("%.1f", null->mean()) + " ± " + fmt("%.1f", null->sd()));
      plot.line((x0 + x1) / 2, std::max(0.0, null->mean() - null->sd()), (x0 + x1) / 2, null->mean() + null->sd(),
                "#333");
    }
    char tick[48];
    std::snprintf(tick, sizeof tick, "m%d L%d", ls.model, ls.layer);
    plot.label(g + 0.5, -top * 0.06, tick);
  }
  plot.legend(0, kGreen, "observed");
  plot.legend(1, kGray, "chance: random rotations");
  if (a.permutation_null.applies()) plot.legend(2, "#c9ccd1", "chance: random permutations");
  return plot.finish();
}

}  // namespace

nlohmann::json summary_json(const ReportInput& in) {
  const Analysis& a = *in.analysis;
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& ls : a.layers)
    layers.push_back({{"model", ls.model},
                      {"layer", ls.layer},
                      {"neurons", ls.neurons},
                      {"dead", ls.dead},
                      {"universal", ls.universal},
                      {"rotation_null", null_json(ls.rotation_null)},
                      {"permutation_null", null_json(ls.permutation_null)}});
  return {{"models", in.models},
          {"site", in.site},
          {"data", in.data},
          {"tokens", a.tokens},
          {"match", to_string(a.options.match)},
          {"scope", to_string(a.options.scope)},
          {"threshold", a.options.threshold},
          {"baseline_draws", a.options.baseline_draws},
          {"null_draws", a.options.null_draws},
          {"seed", a.options.seed},
          {"analysis_device", to_string(a.options.device)},
          {"model_loss", in.loss},
          {"layers", layers},
          {"universal", a.universal},
          {"rotation_null", null_json(a.rotation_null)},
          {"permutation_null", null_json(a.permutation_null)},
          {"exceeds_chance", a.exceeds_chance},
          {"verdict", a.verdict},
          {"timings_seconds", in.timings}};
}

std::string neurons_csv(const Analysis& a) {
  std::string out =
      "model,layer,neuron,partner,match_layer,match_index,r,baseline_r,pair_excess,excess,universal,dead\n";
  char line[256];
  for (const auto& nr : a.neurons)
    for (const auto& p : nr.partners) {
      std::snprintf(line, sizeof line, "%d,%d,%d,%d,%d,%d,%.6f,%.6f,%.6f,%.6f,%d,%d\n", nr.model, nr.layer, nr.neuron,
                    p.partner, p.layer, p.index, p.r, p.baseline, p.r - p.baseline, nr.excess, nr.universal ? 1 : 0,
                    nr.dead ? 1 : 0);
      out += line;
    }
  return out;
}

std::string report_html(const ReportInput& in) {
  const Analysis& a = *in.analysis;
  std::ostringstream h;
  h << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>univ: universal neurons</title>\n"
    << "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    << "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    << ".verdict{font-size:1.15em;padding:.6em 1em;border-left:5px solid "
    << (a.exceeds_chance ? kGreen : kRed) << ";background:#f6f6f6}figure{margin:1.5em 0}</style></head><body>\n";
  h << "<h1>Universal neurons</h1>\n<p class=\"verdict\">" << escape_html(a.verdict) << "</p>\n";
  h << "<p>" << a.tokens << " held-out tokens; site <b>" << escape_html(in.site) << "</b>; "
    << escape_html(to_string(a.options.match)) << " matching";
  if (a.options.match != MatchMode::index) h << " (scope " << to_string(a.options.scope) << ")";
  h << "; a neuron is universal when its excess correlation (matched r minus the mean matched r over "
    << a.options.baseline_draws << " Haar-random rotations of the partner's neurons, averaged over partners) tops "
    << fmt("%.2f", a.options.threshold) << ". Chance: " << a.options.null_draws
    << " further rotations in place of the partner";
  if (a.permutation_null.applies()) h << ", and as many random permutations of the partners";
  h << "; a count exceeds chance above the null's mean plus three standard deviations.</p>\n";

  h << "<h2>Models</h2>\n<table><tr><th>model</th><th>checkpoint</th><th>seed</th><th>step</th><th>layers x d_mlp</th>"
    << "<th>loss on these tokens</th></tr>\n";
  for (size_t m = 0; m < in.models.size(); ++m) {
    const auto& info = in.models[m];
 auto field = [&](const char* key) { return info.contains(key) ? info.at(key).dump() : std::string("-"); };
    h << "<tr><td>" << m << "</td><td style=\"text-align:left\">" << escape_html(info.value("path", ""))
      << "</td><td>" << field("seed") << "</td><td>" << field("step") << "</td><td>" << info.at("config").value("layers", 0) << " x " << info.at("config").value("d_mlp", 0)
      << "</td><td>" << (m < in.loss.size() ? fmt("%.4f", in.loss[m]) : std::string("n/a")) << "</td></tr>\n";
  }
  h << "</table>\n<h2>Per layer</h2>\n<table><tr><th>model</th><th>layer</th><th>neurons</th><th>dead</th>"
    << "<th>universal</th><th>chance: rotations</th><th>chance: permutations</th></tr>\n";
  auto null_cell = [](const NullCount& n) {
    return n.applies() ? fmt("%.1f", n.mean()) + " ± " + fmt("%.1f", n.sd()) : std::string("n/a");
  };
  for (const auto& ls : a.layers)
    h << "<tr><td>" << ls.model << "</td><td>" << ls.layer << "</td><td>" << ls.neurons << "</td><td>" << ls.dead
      << "</td><td><b>" << ls.universal << "</b></td><td>" << null_cell(ls.rotation_null) << "</td><td>"
      << null_cell(ls.permutation_null) << "</td></tr>\n";
  h << "<tr><th colspan=\"4\">all</th><th>" << a.universal << "</th><th>" << null_cell(a.rotation_null) << "</th><th>"
    << null_cell(a.permutation_null) << "</th></tr>\n</table>\n";
  h << "<figure>" << scatter_plot(a) << "<figcaption>Each neuron with each partner: the correlation with its matched "
    << "partner neuron against the same under random rotations of the partner's neurons. Green: universal.</figcaption>"
    << "</figure>\n";
  h << "<figure>" << excess_histogram(a) << "<figcaption>Excess correlation, averaged over partners; the dashed line "
    << "is the threshold.</figcaption></figure>\n";
  h << "<figure>" << layer_bars(a) << "<figcaption>Universal neurons per model and layer, beside the counts the null "
    << "models give (mean ± sd).</figcaption></figure>\n";
  h << "<p>Files: <code>neurons.csv</code> (every neuron and partner), <code>summary.json</code>.</p>\n</body></html>\n";
  return h.str();
}

void write_report(const fs::path& dir, const ReportInput& input) {
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw UserError("--out " + dir.string() + " is a file, not a directory");
  fs::create_directories(dir, ec);
  if (ec) throw UserError("cannot create output directory " + dir.string() + ": " + ec.message());
  write_file_atomic(dir / "neurons.csv", neurons_csv(*input.analysis));
  write_file_atomic(dir / "summary.json", summary_json(input).dump(2) + "\n");
  write_file_atomic(dir / "report.html", report_html(input));
}

}  // namespace univ
