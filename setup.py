"""Build script for the optional C extensions: `vramfit.kernels.cpu._qgemm` (fast CPU matmuls),
`vramfit.quant._cenc` (quantization encoders) and `vramfit.runtime._bpe` (compact BPE tables).

Everything else about the package lives in pyproject.toml. The kernel and encoder extensions are built
only on x86-64 Linux/Unix, the BPE tables on any platform; any failure to compile leaves the package
installable, and each module's `available()` then reports False so its pure-Python or HF path is used.
"""

import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SRC = "vramfit/kernels/cpu/"
QSRC = "vramfit/quant/cenc/"


class OptionalBuildExt(build_ext):
    """Build extensions, but never fail the install because of them."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler/setup failure means "no fast path"
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        msg = f"WARNING: vramfit fast CPU kernels not built ({exc}); using the reference path"
        print(msg, file=sys.stderr)


def _extensions():
    # byte-level BPE tables (vramfit.runtime.bpe): portable C, any platform
    bpe = Extension("vramfit.runtime._bpe", ["vramfit/runtime/bpe.c"], extra_compile_args=["-O2", "-g0"])
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64") or sys.platform == "win32":
        return [bpe]
    return [
        bpe,
        Extension(
            "vramfit.kernels.cpu._qgemm",
            sources=[
                SRC + f
                for f in (
                    "qgemm_module.c",
                    "qgemm_avx2.c",
                    "qgemm_avx512.c",
                    "qattn_avx512.c",
                    "qops_avx512.c",
                    "qops_avx2.c",
                    "qlayer.c",
                )
            ],
            depends=[
                SRC + f
                for f in (
                    "qgemm.h",
                    "qgemm_impl.h",
                    "qgemm_unpack.h",
                    "qgemm_unpack_iqk.h",
                    "qgemm_decode.h",
                    "qgemm_decode_avx2.h",
                    "qgemm_fused.h",
                    "qgemm_tiles.h",
                    "qgemm_tiles_avx2.h",
                    "qgemm_tile_layout.h",
                    "qgemm_dec_table.h",
                    "qmath_avx512.h",
                    "qmath_avx2.h",
                    "qlayer.h",
                )
            ],
            extra_compile_args=["-O3", "-g0", "-std=gnu11", "-pthread", "-fno-math-errno"],
            extra_link_args=["-pthread"],
        ),
        Extension(  # C quantization encoders (vramfit.quant.fast); exact float order: no contraction
            "vramfit.quant._cenc",
            sources=[QSRC + f for f in ("cenc_module.c", "iqk.c", "legacy.c", "search_avx2.c")],
            depends=[QSRC + f for f in ("cenc.h", "cenc_int.h")],
            extra_compile_args=[
                "-O3",
                "-g0",
                "-std=gnu11",
                "-fopenmp",
                "-fno-math-errno",
                "-ffp-contract=off",
            ],
            extra_link_args=["-fopenmp"],
        ),
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
