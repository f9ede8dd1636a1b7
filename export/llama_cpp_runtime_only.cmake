# Passed to the llama-cpp-python build by `make setup-export` as
#   CMAKE_ARGS="-DCMAKE_PROJECT_llama.cpp_INCLUDE=<this file> ..."
# CMake includes it right after llama.cpp's project() call. llama-cpp-python forces llama.cpp's
# `common` helper library on, but the Python bindings load only libllama and libggml*; common
# (chat templates, argument parsing, JSON grammar: about half of all objects) is never loaded.
# Turning it off here roughly halves the compile time of `make setup-export` on a small machine.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)
