"""The device side of the runtime: what runs on each phone.

These modules are copied verbatim into every bundle (as ``llc_runtime/``), so
they import only the standard library, numpy, onnxruntime and pyzmq, and each
other by relative import, never ``llc``. The coordinator imports the same
``protocol``, ``sampling`` and ``manifest`` modules from here, so both sides of
the wire are one code.

    manifest  the bundle's manifest.json, checked into typed dataclasses
    protocol  message types, framing and validation (never pickle)
    sampling  sampling parameters and the sampler (the tail samples)
    stage     one pipeline stage: requests, KV caches, inputs, outputs (no sockets)
    main      sockets, the poll loop and the command line (``python -m llc_runtime.main``)
"""

PACKAGE = "llc_runtime"  # the name of this folder inside a bundle
