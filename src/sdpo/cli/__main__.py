"""python -m sdpo.cli, e.g. under accelerate launch -m or torchrun."""

from sdpo.cli import main

main()
