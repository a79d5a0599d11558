"""fdl's native CPU kernels (C++ XLA FFI handlers on oneDNN 3): :mod:`fdl._ext.build` compiles
them (at install time, or on first use), :mod:`fdl._ext.loader` loads them; ``fdl.kernels()``
reports what runs."""
