// Makes the shared library importable as `adaskip._C`; importing it runs the static
// registrations in registration.cpp, which populate torch.ops.adaskip.
#include <Python.h>

static PyModuleDef adaskip_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "adaskip CUDA kernels; use them through adaskip.ops or torch.ops.adaskip", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&adaskip_module); }
