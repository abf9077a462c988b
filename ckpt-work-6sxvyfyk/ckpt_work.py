
import hashlib, time

def digest(i):
    time.sleep(0.02)
    return hashlib.sha256(str(i).encode()).hexdigest()[:12]

def scaled_sum(args):
    name, start, factor = args
    from multiprocessing import shared_memory
    import numpy as np
    shm = shared_memory.SharedMemory(name=name)
    try:
        view = np.ndarray((1000,), dtype=np.float64, buffer=shm.buf)
        view[start:start + 100] *= factor
        return float(view[start:start + 100].sum())
    finally:
        del view
        shm.close()
