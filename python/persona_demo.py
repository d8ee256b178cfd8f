"""PersonaFuse end to end: ten Big Five persona experts in every projection of a small Llama, trained with a
situation-aware router on the persona dialogue set that ships with the package, then routed, saved, reloaded,
generating with a persona mix, and timed against the per-expert loop. The same as `personafuse demo`.

    python python/persona_demo.py --mix "E+=0.7,A+=0.3" --prompt "the party tonight will be huge"
    python python/persona_demo.py --help

The engine is personafuse_kernels.demo (public: read it as the recipe); this script is its command line.
"""
import sys

from personafuse_kernels.demo import main

if __name__ == "__main__":
    sys.exit(main())
