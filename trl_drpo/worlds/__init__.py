"""Small, real worlds in which DrPO's effect can be measured on a CPU.

Each world ships a pretrained one-step text-to-image pipeline, the data it was trained on, and a black-box verifier
that scores generated images against their captions (the role GenEval plays for SD-Turbo in the paper, Table 2).
"""
