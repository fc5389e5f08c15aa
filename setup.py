"""Build hook: compiles native/ into migrate._native with cffi (API mode)."""
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
