# The command-line package lives in cli/ but is installed as ``relex_cli`` (never as a bare ``cli``).
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["relex", "relex.*"]) + ["relex_cli"],
    package_dir={"relex_cli": "cli"},
)
