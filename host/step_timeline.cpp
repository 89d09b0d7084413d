#include "univ/step_timeline.hpp"

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>

namespace univ {

namespace {

double us(uint64_t ns) { return static_cast<double>(ns) / 1e3; }

// The time some kernel of `stream` (all: any stream) ran, of kernels by start: their
// intervals' union, which grows by what reaches past the time covered so far.
double busy_us(const std::vector<KernelSpan>& kernels, const uint32_t* stream) {
  double busy = 0;
  uint64_t covered_to = 0;
  for (const KernelSpan& k : kernels) {
    if (stream && k.stream != *stream) continue;
    const uint64_t from = std::max(k.start_ns, covered_to);
    if (k.end_ns > from) busy += us(k.end_ns - from);
    covered_to = std::max(covered_to, k.end_ns);
  }
  return busy;
}

StepTimeline make_step(std::vector<KernelSpan> kernels, bool chained) {
  StepTimeline s;
  s.kernels = std::move(kernels);
  const std::vector<KernelSpan>& k = s.kernels;
  uint64_t last_end = 0;
  size_t last = 0;
  std::set<uint32_t> streams;
  for (size_t i = 0; i < k.size(); ++i) {
    s.kernel_us += us(k[i].end_ns - k[i].start_ns);
    streams.insert(k[i].stream);
    if (k[i].end_ns >= last_end) last_end = k[i].end_ns, last = i;
  }
  s.span_us = us(last_end - k.front().start_ns);
  s.busy_us = busy_us(k, nullptr);
  for (const uint32_t stream : streams) s.stream_busy_us.emplace_back(stream, busy_us(k, &stream));
  for (size_t at = last;;) {
    s.chain.push_back(at);
    // the link before: by how late it still held the GPU before `at` started
    size_t before = k.size();
    auto held_until = [&](size_t i) { return std::min(k[i].end_ns, k[at].start_ns); };
    for (size_t i = 0; i < k.size(); ++i) {
      if (k[i].start_ns >= k[at].start_ns || (!chained && k[i].end_ns > k[at].start_ns)) continue;
      if (before == k.size() || held_until(i) > held_until(before) ||
          (held_until(i) == held_until(before) && k[i].start_ns > k[before].start_ns))
        before = i;
    }
    if (before == k.size()) break;
    at = before;
  }
  std::reverse(s.chain.begin(), s.chain.end());
  for (size_t i = 0; i < s.chain.size(); ++i) {
    const KernelSpan& link = k[s.chain[i]];
    s.chain_kernel_us += us(link.end_ns - link.start_ns);
    const uint64_t before_end = i > 0 ? k[s.chain[i - 1]].end_ns : link.start_ns;
    if (link.start_ns > before_end) s.chain_gap_us += us(link.start_ns - before_end);
  }
  return s;
}

}  // namespace

std::vector<StepTimeline> step_timelines(std::vector<KernelSpan> kernels, const std::string& first_kernel,
                                        bool chained) {
  std::stable_sort(kernels.begin(), kernels.end(), [](const KernelSpan& a, const KernelSpan& b) {
    return a.start_ns != b.start_ns ? a.start_ns < b.start_ns : a.end_ns < b.end_ns;
  });
  std::vector<StepTimeline> steps;
  std::vector<KernelSpan> step;
  for (KernelSpan& k : kernels) {
    const bool starts_step = k.name.find(first_kernel) != std::string::npos;
    if (starts_step && !step.empty()) steps.push_back(make_step(std::move(step), chained)), step.clear();
    if (starts_step || !step.empty()) step.push_back(std::move(k));
  }
  if (!step.empty()) steps.push_back(make_step(std::move(step), chained));
  return steps;
}

std::string short_kernel_name(const std::string& demangled) {
  std::string name = demangled;
  if (!name.empty() && name.back() == ')') {  // the parameter list
    int depth = 0;
    for (size_t i = name.size(); i-- > 0;) {
      depth += name[i] == ')' ? 1 : name[i] == '(' ? -1 : 0;
      if (depth == 0) {
        name.erase(i);
        break;
      }
    }
  }
  for (const std::string noise : {"(anonymous namespace)::", "univ::cuda::"})
    for (size_t at; (at = name.find(noise)) != std::string::npos;) name.erase(at, noise.size());
  if (name.rfind("void ", 0) == 0) name.erase(0, 5);
  int depth = 0;  // other qualifiers: what precedes the last "::" outside template arguments
  size_t after = 0;
  for (size_t i = 0; i + 1 < name.size(); ++i) {
    depth += name[i] == '<' ? 1 : name[i] == '>' ? -1 : 0;
    if (depth == 0 && name[i] == ':' && name[i + 1] == ':') after = i + 2;
  }
  return name.substr(after);
}

std::string describe_step(const StepTimeline& s) {
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line,
                "step: span %.1f us, some kernel running %.1f us (none %.1f us); %zu kernels on %zu streams, %.1f us "
                "in all\nstreams, us with a kernel running:",
                s.span_us, s.busy_us, s.span_us - s.busy_us, s.kernels.size(), s.stream_busy_us.size(), s.kernel_us);
  out += line;
  for (const auto& [stream, busy] : s.stream_busy_us) {
    std::snprintf(line, sizeof line, " %u: %.1f", stream, busy);
    out += line;
  }
  std::snprintf(line, sizeof line, "\nbounding chain: %zu kernels, %.1f us running, %.1f us between them\n",
                s.chain.size(), s.chain_kernel_us, s.chain_gap_us);
  out += line;
  out += "     start      gap     time  stream  kernel\n";
  const uint64_t t0 = s.kernels.front().start_ns;
  for (size_t i = 0; i < s.chain.size(); ++i) {
    const KernelSpan& k = s.kernels[s.chain[i]];
    const double gap = i == 0 ? 0.0 : us(k.start_ns) - us(s.kernels[s.chain[i - 1]].end_ns);
    std::snprintf(line, sizeof line, "  %8.1f %8.1f %8.1f %7u  %.90s\n", us(k.start_ns - t0), gap,
                  us(k.end_ns - k.start_ns), k.stream, k.name.c_str());
    out += line;
  }
  std::map<std::string, std::pair<double, int>> by_name;
  for (const KernelSpan& k : s.kernels) {
    auto& [time, count] = by_name[k.name];
    time += us(k.end_ns - k.start_ns);
    ++count;
  }
  std::vector<std::pair<std::string, std::pair<double, int>>> sorted(by_name.begin(), by_name.end());
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  out += "by kernel:     us  count\n";
  for (const auto& [name, total] : sorted) {
    std::snprintf(line, sizeof line, "        %8.1f %6d  %.90s\n", total.first, total.second, name.c_str());
    out += line;
  }
  return out;
}

}  // namespace univ
