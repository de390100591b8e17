"""`mocobench env`: what this installation runs on (mocobench.utils.env.collect_env)."""
import argparse

from mocobench.utils.env import collect_env


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="mocobench env", description=__doc__)
    parser.parse_args(argv)
    rows = collect_env()
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
