"""Optional native extensions (C++ via XLA FFI). See :mod:`fdl._ext.build`."""
