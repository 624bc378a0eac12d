"""``python -m kdcache`` runs the command line (also under torchrun)."""

from kdcache_cli.main import main

main()
