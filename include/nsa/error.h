// Error type and checking macros shared by the whole library.
// Library code throws nsa::Error; it never exits or aborts.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace nsa {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
[[noreturn]] void throw_error(const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace nsa

// NSA_CHECK(cond, "fmt {}", args...): throws nsa::Error with the formatted message.
#define NSA_CHECK(cond, ...)                                                    \
  do {                                                                          \
    if (!(cond)) {                                                              \
      ::nsa::detail::throw_error(__FILE__, __LINE__, fmt::format(__VA_ARGS__)); \
    }                                                                           \
  } while (0)

#define NSA_FAIL(...) ::nsa::detail::throw_error(__FILE__, __LINE__, fmt::format(__VA_ARGS__))
