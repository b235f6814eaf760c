// Marks functions that must compile for both the CPU driver and the CUDA driver.
// Under nvcc they become __host__ __device__; elsewhere plain inline functions.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAFEDL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SAFEDL_HOST_DEVICE inline
#endif
