"""Declares the compiled extensions; everything else lives in pyproject.toml.

STEMEDB_BUILD=debug builds without optimisation and with assertions;
STEMEDB_BUILD=asan adds AddressSanitizer; STEMEDB_BUILD=profile is the optimised build
with its symbols kept, for perf. The default is an optimised build,
linked with -s: the extensions carry no symbol table and no debug sections
(Python's own CFLAGS often include -g), which keeps the wheel small. Debug and asan
builds keep both, for debuggers and sanitizer reports.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODE = os.environ.get("STEMEDB_BUILD", "release")
COMPILE = {
    "release": ["-O3"],
    "debug": ["-O0", "-g", "-UNDEBUG"],
    "asan": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
    "profile": ["-O3", "-g", "-fno-omit-frame-pointer"],
}
LINK = {
    "release": ["-s"],
    "debug": [],
    "asan": ["-fsanitize=address"],
    "profile": [],
}
if MODE not in COMPILE:
    raise SystemExit(f"STEMEDB_BUILD={MODE!r}: expected one of {', '.join(COMPILE)}")

MODULES = {
    "_hash": ["ext/stemedb/_hash.pyx", "ext/stemedb/blake3_impl.c"],
    "_codec": ["ext/stemedb/_codec.pyx", "ext/stemedb/blake3_impl.c"],
    "_index": ["ext/stemedb/_index.pyx"],
    "_segment": ["ext/stemedb/_segment.pyx", "ext/stemedb/blake3_impl.c"],
    "_protocol": ["ext/stemedb/_protocol.pyx"],
    "_reconcile": ["ext/stemedb/_reconcile.pyx", "ext/stemedb/blake3_impl.c"],
    "_lines": ["ext/stemedb/_lines.pyx"],
    "_pair": ["ext/stemedb/_pair.pyx"],
    "_point": ["ext/stemedb/_point.pyx"],
    "_single": ["ext/stemedb/_single.pyx"],
}

extensions = [
    Extension(
        f"stemedb.{name}",
        sources,
        include_dirs=["ext/stemedb"],
        extra_compile_args=COMPILE[MODE],
        extra_link_args=LINK[MODE],
    )
    for name, sources in MODULES.items()
]



class BuildExt(build_ext):
    """build_ext on every core, without the run path of the interpreter that builds.

    A Python built with --enable-shared (pyenv's, for one) puts -Wl,-rpath
    with its own lib directory into LDSHARED. The extensions need no library
    from there (libpython comes from the interpreter that loads them), and in
    a wheel that path of the build machine would be searched first on every
    machine the wheel is installed on.
    """

    def finalize_options(self) -> None:
        super().finalize_options()
        # The extensions are independent: compile them on every core unless told otherwise
        # (pip install and python -m build pass no --parallel).
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def build_extensions(self) -> None:
        linker = self.compiler.linker_so
        self.compiler.linker_so = [arg for arg in linker if not arg.startswith("-Wl,-rpath")]
        super().build_extensions()


setup(
    cmdclass={"build_ext": BuildExt},
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
