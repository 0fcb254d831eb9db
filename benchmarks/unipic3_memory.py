"""Print the estimated peak GPU memory of UniPic-3 (bf16 / fp8 / NF4, with and without model CPU offload,
1, 3 and 6 inputs at 1024²) and which 16/24/48/80 GB cards each fits. The model is
`unipic.unipic3.memory`; this script only runs it: `python benchmarks/unipic3_memory.py [--json]`."""

from unipic.unipic3.memory import main

if __name__ == "__main__":
    main()
