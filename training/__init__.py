"""Train a face recognizer from a dataset version and export it as an insightface-style ONNX.

Closing the loop: published labels -> a recognizer trained on them -> (``faceloop models
register``) -> the next refresh re-embeds existing faces with it
(:func:`tasks.reembed.reembed_faces`) and re-labels them.

* Backbone: :class:`SmallFaceNet`, a deliberately small CNN (112x112 RGB -> 128-d or 512-d),
  fast enough to train on a CPU in seconds for smoke tests; on a GPU it runs unchanged.
* Head: :class:`PartialFCArcFace`, an ArcFace additive angular margin over a class-sampled
  softmax (Partial FC): each step uses the batch's classes plus random negatives, so the
  ``num_classes x dim`` weight matrix may be far larger than what one step touches. Its
  gradient is sparse (only the sampled rows) and it is updated by plain SGD, which keeps no
  per-class optimiser state: at 10^6 classes x 128-d the head is 512 MB of float32, at 512-d
  2 GB, and nothing else scales with the class count except one ``num_classes`` float vector
  per step used to draw negatives.
* Export: ``torch.onnx.export`` of the backbone with input ``(N, 3, 112, 112)`` float32 RGB,
  ``(x - 127.5) / 127.5`` and a raw (not normalised) embedding output, which is exactly what
  insightface's ``ArcFaceONNX`` feeds and expects (it swaps BGR->RGB and normalises itself),
  so ``insightface.model_zoo.get_model`` loads the file through the same code path as the
  shipped recognizers.

Identity ids stay stable across a re-embed: ``reembed_faces`` changes only the
``embedding`` (and ``model``) columns; the re-labelling that follows clusters the new
embeddings and ``tasks.cluster.assign_identity_ids`` gives every new cluster the previous
identity id held by most of its faces, so an identity whose membership is unchanged keeps its id.

Modules: :mod:`training.model` (networks), :mod:`training.loop` (the two training loops),
:mod:`training.export` (ONNX export), :mod:`training.registry` (the store's model registry) and
:mod:`training.infer` (onnxruntime inference). Only ``model``, ``loop`` and ``export`` import
torch; the refresh uses ``registry`` and ``infer`` only.
"""
