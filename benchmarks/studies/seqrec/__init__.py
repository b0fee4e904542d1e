"""The sequential-recommendation benchmark (`derl bench --suite seqrec`, docs/seqrec.md).

Leave-one-out with full ranking on public sequence data (Amazon Beauty and Sports, MovieLens),
the protocol of the published SASRec / S3-Rec / eSASRec tables, and reference models to measure
against them:

- `data`: loading (seq lines, RecBole .inter, ML-100K u.data, ML-1M ratings.dat) and the split;
- `metrics`: full-ranking HR@K / NDCG@K on batched user x item score matrices;
- `models`: the registry (`MODELS`) and the reference models (popularity, SASRec with its
  original loss, SASRec with a sampled softmax);
- `train`: the training loop with early stopping on validation, resumable;
- `suite`: the runner writing DIR/bench.json, DIR/bench.md and DIR/seqrec.png.
"""
