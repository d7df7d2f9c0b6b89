# End-to-end CLI check: `nsa init`, `nsa run` (prefill + decode, and prefill only) and `nsa info`.
# Usage: cmake -DNSA=<path to nsa> -DWORK=<scratch dir> -P cli_run_roundtrip.cmake
cmake_minimum_required(VERSION 3.24)
if(NOT NSA OR NOT WORK)
  message(FATAL_ERROR "set -DNSA=<nsa binary> and -DWORK=<scratch directory>")
endif()

file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")

# Runs `nsa <args>`; fails on a non-zero exit and leaves stdout in NSA_STDOUT.
function(nsa_run)
  execute_process(COMMAND "${NSA}" ${ARGN}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "nsa ${ARGN} failed (${rc}):\n${out}${err}")
  endif()
  set(NSA_STDOUT "${out}" PARENT_SCOPE)
endfunction()

function(require_file path)
  if(NOT EXISTS "${path}")
    message(FATAL_ERROR "expected output file ${path} is missing")
  endif()
endfunction()

# Checks that a safetensors output holds every output tensor, with y of shape [2, 70, 32].
function(check_outputs path)
  require_file("${path}")
  # The header length is an 8-byte little-endian integer; headers here are far below 4 GiB.
  file(READ "${path}" len_hex LIMIT 8 HEX)
  string(REGEX REPLACE "^(..)(..)(..)(..).*" "0x\\4\\3\\2\\1" len_hex "${len_hex}")
  math(EXPR header_len "${len_hex}")
  file(READ "${path}" header OFFSET 8 LIMIT ${header_len})
  foreach(name y gates sel_blocks o_cmp o_sel o_win reads)
    string(FIND "${header}" "\"${name}\":" pos)
    if(pos EQUAL -1)
      message(FATAL_ERROR "${path} has no tensor '${name}'; header: ${header}")
    endif()
  endforeach()
  string(FIND "${header}" "[2,70,32]" pos)
  if(pos EQUAL -1)
    message(FATAL_ERROR "${path} has no tensor of shape [2, 70, 32]; header: ${header}")
  endif()
endfunction()

set(config "${WORK}/config.json")
file(WRITE "${config}" [=[
{"dim": 32, "heads": 4, "groups": 2, "dk": 8, "dv": 8, "l": 8, "d": 4,
 "l_sel": 16, "n_sel": 4, "w": 16}
]=])

nsa_run(init --config "${config}" --weights "${WORK}/w.safetensors"
        --input "${WORK}/x.safetensors" --B 2 --T 70 --seed 1)
require_file("${WORK}/w.safetensors")
require_file("${WORK}/x.safetensors")

nsa_run(run --config "${config}" --weights "${WORK}/w.safetensors" --input "${WORK}/x.safetensors"
        --out "${WORK}/y_prefill30.safetensors" --prefill 30)
check_outputs("${WORK}/y_prefill30.safetensors")

nsa_run(run --config "${config}" --weights "${WORK}/w.safetensors" --input "${WORK}/x.safetensors"
        --out "${WORK}/y_all.safetensors")
check_outputs("${WORK}/y_all.safetensors")

# Both runs produce the same tensors and shapes, so the files have the same size.
file(SIZE "${WORK}/y_prefill30.safetensors" size_a)
file(SIZE "${WORK}/y_all.safetensors" size_b)
if(NOT size_a EQUAL size_b)
  message(FATAL_ERROR "output sizes differ: ${size_a} (prefill 30) vs ${size_b} (all)")
endif()

nsa_run(info)
string(FIND "${NSA_STDOUT}" "devices: cpu" pos)
if(pos EQUAL -1)
  message(FATAL_ERROR "nsa info printed no device line:\n${NSA_STDOUT}")
endif()

message(STATUS "cli_run_roundtrip: ok")
