// Makes the shared library importable as `adaskip._C`; importing it runs the static
// registrations in registration.cpp, which populate torch.ops.adaskip.
//
// The module's own functions are the kernels' host-side choices (host_choices.h), with plain
// numbers and strings in and out, so that tests can check them without a GPU. They are not
// operators: they take no tensors and have nothing to dispatch. adaskip.ops wraps them.
#include <Python.h>

#include "host_choices.h"

namespace {

PyObject* py_choose_splits(PyObject*, PyObject* args) {
  long long batch, kv_heads, capacity, resident_blocks, tile_keys;
  if (!PyArg_ParseTuple(args, "LLLLL:choose_splits", &batch, &kv_heads, &capacity, &resident_blocks, &tile_keys)) {
    return nullptr;
  }
  return PyLong_FromLong(adaskip::choose_splits(batch, kv_heads, capacity, resident_blocks, tile_keys));
}

PyObject* py_decode_tile_keys(PyObject*, PyObject* args) {
  int head_dim;
  if (!PyArg_ParseTuple(args, "i:decode_tile_keys", &head_dim)) return nullptr;
  if (head_dim != 64 && head_dim != 128) {
    PyErr_Format(PyExc_ValueError, "adaskip: the decode attention kernel takes head_dim 64 or 128, got %d", head_dim);
    return nullptr;
  }
  return PyLong_FromLong(adaskip::decode_tile_keys(head_dim));
}

// value: a string or None (the variable unset). Returns -1 (auto), 0 (off) or 1 (on); a value
// the kernels would refuse raises the kernels' ValueError.
PyObject* py_pipeline_mode(PyObject*, PyObject* args) {
  const char* value = nullptr;
  if (!PyArg_ParseTuple(args, "z:pipeline_mode", &value)) return nullptr;
  adaskip::PipelineMode mode = adaskip::PipelineMode::kAuto;
  if (!adaskip::parse_pipeline_mode(value, mode)) {
    PyErr_SetString(PyExc_ValueError, adaskip::pipeline_mode_error(value).c_str());
    return nullptr;
  }
  return PyLong_FromLong(static_cast<int>(mode));
}

// mode: -1 (auto), 0 (off) or 1 (on), as pipeline_mode returns.
PyObject* py_use_pipeline(PyObject*, PyObject* args) {
  int mode;
  long long blocks, chunks, chunks_per_group, piped_blocks_per_sm, sms;
  if (!PyArg_ParseTuple(args, "iLLLLL:use_pipeline", &mode, &blocks, &chunks, &chunks_per_group,
                        &piped_blocks_per_sm, &sms)) {
    return nullptr;
  }
  if (mode < -1 || mode > 1) {
    PyErr_Format(PyExc_ValueError, "adaskip: the pipeline mode must be -1 (auto), 0 (off) or 1 (on), got %d", mode);
    return nullptr;
  }
  return PyBool_FromLong(adaskip::use_pipeline(static_cast<adaskip::PipelineMode>(mode), blocks, chunks,
                                               chunks_per_group, piped_blocks_per_sm, sms));
}

PyMethodDef methods[] = {
    {"choose_splits", py_choose_splits, METH_VARARGS,
     "choose_splits(batch, kv_heads, capacity, resident_blocks, tile_keys) -> int: the decode attention "
     "kernel's splits per (sequence, KV head) when num_splits is 0"},
    {"decode_tile_keys", py_decode_tile_keys, METH_VARARGS,
     "decode_tile_keys(head_dim) -> int: keys one block of the decode attention kernel reads per stage"},
    {"pipeline_mode", py_pipeline_mode, METH_VARARGS,
     "pipeline_mode(value or None) -> -1 (auto), 0 (off) or 1 (on): ADASKIP_GEMV_PIPELINE as the GEMV reads it"},
    {"use_pipeline", py_use_pipeline, METH_VARARGS,
     "use_pipeline(mode, blocks, chunks, chunks_per_group, piped_blocks_per_sm, sms) -> bool: whether the "
     "GEMV launches its pipelined one-row kernel"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef adaskip_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "adaskip CUDA kernels; use them through adaskip.ops or torch.ops.adaskip", -1, methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&adaskip_module); }
