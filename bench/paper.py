"""The paper's evaluation; the code lives in mmpack.evaluation.paper so `mmpack bench paper` runs it too.

    python bench/paper.py --help
"""

import sys

from mmpack.evaluation.paper import main

if __name__ == "__main__":
    main(sys.argv[1:])
