"""Training stage: IResNet backbones, margin heads, closeness/diversity losses, soft mining, trainer."""
