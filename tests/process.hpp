// Runs a program of ours as a child process, capturing exit code, stdout and stderr.
#pragma once
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace univ::testing {

struct ProcessResult {
  int exit_code = -1;  // 128 + signal when killed by a signal
  std::string out, err;
};

// A started child whose output goes to files in `scratch`; optionally with a limit
// on the size of any file it writes (RLIMIT_FSIZE, bytes).
class Process {
 public:
  Process(const std::string& program, const std::vector<std::string>& args, const std::filesystem::path& scratch,
          long file_size_limit = -1)
      : out_path_(scratch / "stdout.txt"), err_path_(scratch / "stderr.txt") {
    std::vector<std::string> argv_storage{program};
    argv_storage.insert(argv_storage.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_storage) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int out = ::open(out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const int err = ::open(err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    pid_ = ::fork();
    if (pid_ == 0) {  // the child: only async-signal-safe calls until exec
      ::dup2(out, 1);
      ::dup2(err, 2);
      if (file_size_limit >= 0) {
        const rlimit limit{static_cast<rlim_t>(file_size_limit), static_cast<rlim_t>(file_size_limit)};
        ::setrlimit(RLIMIT_FSIZE, &limit);
      }
      ::execv(program.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(out);
    ::close(err);
    if (pid_ < 0) throw std::runtime_error("cannot start " + program);
  }
  void signal(int sig) const { ::kill(pid_, sig); }
  ProcessResult wait() {
    int status = 0;
    ::waitpid(pid_, &status, 0);
    ProcessResult r;
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    r.out = slurp(out_path_);
    r.err = slurp(err_path_);
    return r;
  }

 private:
  static std::string slurp(const std::filesystem::path& p) {
    std::ifstream in(p);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  std::filesystem::path out_path_, err_path_;
  pid_t pid_ = -1;
};

inline ProcessResult run_process(const std::string& program, const std::vector<std::string>& args,
                                 const std::filesystem::path& scratch, long file_size_limit = -1) {
  return Process(program, args, scratch, file_size_limit).wait();
}

// train_pair flags for a model small enough for a test (about a millisecond a step),
// writing into `out`, followed by `extra`.
inline std::vector<std::string> tiny_train_flags(const std::filesystem::path& out,
                                                 const std::vector<std::string>& extra) {
  std::vector<std::string> f{"--out",   out.string(), "--seq-len", "8",  "--d-model", "16",  "--heads",
                             "2",       "--d-mlp",    "32",        "--layers", "1",   "--samples", "256",
                             "--batch", "16",         "--test-samples", "64", "--device", "cpu"};
  f.insert(f.end(), extra.begin(), extra.end());
  return f;
}

}  // namespace univ::testing
