"""``python -m accel_nvme.bench --mode ...``: one bench mode in its own process (started by ``accel-nvme bench``)."""

from accel_nvme.bench.worker import main

if __name__ == "__main__":
    main()
