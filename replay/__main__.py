"""``python -m moeca.replay sample`` / ``torchrun -m moeca.replay sample``: the sampler is :mod:`.sample_cli`."""
import sys

from moeca.replay.sample_cli import main

sys.exit(main())
