"""Stream latency per step budget at real model sizes with random weights (same as `streamgen bench`).

    python benchmarks/latency.py --config benchmarks/configs/1.3B.json --out results/
"""

from streamgen.bench import main

if __name__ == "__main__":
    main()
