"""Declares the compiled extensions; everything else lives in pyproject.toml.

STEMEDB_BUILD=debug builds without optimisation and with assertions;
STEMEDB_BUILD=asan adds AddressSanitizer. The default is an optimised build.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

MODE = os.environ.get("STEMEDB_BUILD", "release")
FLAGS = {
    "release": ["-O3"],
    "debug": ["-O0", "-g", "-UNDEBUG"],
    "asan": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
}[MODE]
LINK = ["-fsanitize=address"] if MODE == "asan" else []

MODULES = {
    "_hash": ["ext/stemedb/_hash.pyx", "ext/stemedb/blake3_impl.c"],
    "_codec": ["ext/stemedb/_codec.pyx", "ext/stemedb/blake3_impl.c"],
    "_index": ["ext/stemedb/_index.pyx"],
    "_segment": ["ext/stemedb/_segment.pyx", "ext/stemedb/blake3_impl.c"],
    "_protocol": ["ext/stemedb/_protocol.pyx"],
    "_reconcile": ["ext/stemedb/_reconcile.pyx", "ext/stemedb/blake3_impl.c"],
}

extensions = [
    Extension(
        f"stemedb.{name}",
        sources,
        include_dirs=["ext/stemedb"],
        extra_compile_args=FLAGS,
        extra_link_args=LINK,
    )
    for name, sources in MODULES.items()
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        build_dir="build/cython",
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    )
)
