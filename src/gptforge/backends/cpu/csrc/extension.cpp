// The extension is compiled as this one translation unit (a "unity build"): each concern keeps a file of
// its own for readers, while torch's and pybind11's headers are parsed once rather than once a file
// (a cold build takes ~40 s on 2 cores instead of ~70 s) and the compiler sees every kernel, as it did
// when they were one file. build.py compiles only this file; its cache key reads every file in csrc/.
#include "glue.cpp"
#include "panel.cpp"
#include "amx.cpp"
#include "attention.cpp"
#include "gelu.cpp"
#include "screen.cpp"
#include "decode.cpp"
#include "bindings.cpp"
