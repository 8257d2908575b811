from setuptools import setup

# The cffi extension is compiled against the stable ABI (_cffi.abi3.so): tag the wheel
# abi3 from the lowest supported CPython so one wheel serves 3.9 and later.
setup(cffi_modules=["native/build_cffi.py:ffibuilder"], options={"bdist_wheel": {"py_limited_api": "cp39"}})
