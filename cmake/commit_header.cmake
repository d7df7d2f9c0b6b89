# Writes OUT (a header defining NSA_GIT_COMMIT) at build time, so `nsa info` and the benchmarks'
# metadata name the commit that was built, not the one the build directory was configured at.
# The environment variable NSA_COMMIT overrides git (a copied tree whose .git is stale or
# absent); a tree with uncommitted changes is marked "-dirty". The file is rewritten only when
# its content changes, so an unchanged commit rebuilds nothing.
if(DEFINED ENV{NSA_COMMIT} AND NOT "$ENV{NSA_COMMIT}" STREQUAL "")
  set(commit "$ENV{NSA_COMMIT}")
else()
  execute_process(COMMAND git describe --always --dirty --abbrev=7 WORKING_DIRECTORY "${SRC}"
                  OUTPUT_VARIABLE commit OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT commit)
    set(commit "unknown")
  endif()
endif()
set(text "#pragma once\n#define NSA_GIT_COMMIT \"${commit}\"\n")
if(EXISTS "${OUT}")
  file(READ "${OUT}" old)
endif()
if(NOT "${old}" STREQUAL "${text}")
  file(WRITE "${OUT}" "${text}")
endif()
