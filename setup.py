"""Packages are found, never listed: a subpackage added to kdcache/ or cli/ cannot be left out of the
wheel. Everything else about the build is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["kdcache", "kdcache.*"]),
              *(f"kdcache_cli.{name}" for name in find_packages("cli")), "kdcache_cli"],
    package_dir={"kdcache_cli": "cli"},
)
