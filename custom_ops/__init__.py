"""segtwin custom operators: the PSA mask op of PSANet as C++ CPU / CUDA kernels for PyTorch and PaddlePaddle.

Sources (package data): include/*.h (framework-free kernel bodies and CPU loop), cuda/*.cu (framework-free CUDA
kernels), torch/*.cpp and paddle/*.cc (framework glue). `custom_ops.build` JIT-builds and caches them; the Python
entry points are `torch_ref.ops.psa_mask` and `paddle_impl.ops.psa_mask`.
"""
