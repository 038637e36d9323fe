# Native threads (POSIX), as the modules that split work over cores declare them
# (_hash's BLAKE3 of many inputs, _segment's batch gather). Declarations only.

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr,
                       void *(*start_routine)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
