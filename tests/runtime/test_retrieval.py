"""Retrieval recall and top-1 accuracy against hand-counted ranks."""

import pytest
import torch

from fedafd.runtime.retrieval import pair_retrieval_metrics, retrieval_metrics, top1_accuracy


def test_three_by_three_hand_ranks():
    # Prepare: images e_0, e_1, e_2; caption j describes image j
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.8, 0.0, 0.6]])
    # Execute
    m = retrieval_metrics(images, texts, [0, 1, 2])
    # Assert
    # t2i: caption 0 scores [1, 0, 0]     -> rank 0
    #      caption 1 scores [0.6, 0.8, 0] -> rank 0
    #      caption 2 scores [0.8, 0, 0.6] -> image 0 beats image 2 -> rank 1
    #      R@1 = 2/3 = 66.67, R@5 = R@10 = 100
    # i2t: image 0 scores [1, 0.6, 0.8] -> rank 0; image 1 [0, 0.8, 0] -> 0;
    #      image 2 [0, 0, 0.6] -> 0
    assert m["t2i_r1"] == pytest.approx(200 / 3)
    assert m["t2i_r5"] == m["t2i_r10"] == pytest.approx(100.0)
    assert m["i2t_r1"] == m["i2t_r5"] == m["i2t_r10"] == pytest.approx(100.0)
    # rsum = 100 * 3 + 66.67 + 100 + 100 = 566.67; r1_sum = 100 + 66.67 = 166.67
    assert m["rsum"] == pytest.approx(300 + 200 / 3 + 200)
    assert m["r1_sum"] == pytest.approx(100 + 200 / 3)


def test_many_captions_per_image_uses_best_ground_truth():
    # Prepare: images e_0 = [1, 0], e_1 = [0, 1]; captions 0, 1 describe image 0; 2, 3 image 1
    images = torch.eye(2)
    texts = torch.tensor([[0.6, 0.8], [0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    # Execute
    m = retrieval_metrics(images, texts, torch.tensor([0, 0, 1, 1]))
    # Assert
    # i2t image 0: scores over captions [0.6, 0.8, 1, 0]; best GT = caption 1 (0.8);
    #   wrong caption 2 scores 1 >= 0.8 -> rank 1
    # i2t image 1: scores [0.8, 0.6, 0, 1]; best GT = caption 3 (1.0) -> rank 0
    #   (its other caption, 2, would be rank 2: the best one counts)
    #   i2t R@1 = 50, R@5 = R@10 = 100
    # t2i: caption 0 [0.6, 0.8] GT 0 -> rank 1; caption 1 [0.8, 0.6] -> 0;
    #      caption 2 [1, 0] GT 1 -> rank 1; caption 3 [0, 1] -> 0. R@1 = 50, R@5 = R@10 = 100
    assert m["i2t_r1"] == pytest.approx(50.0)
    assert m["t2i_r1"] == pytest.approx(50.0)
    for key in ("i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"):
        assert m[key] == pytest.approx(100.0)
    # rsum = 50 + 100 + 100 + 50 + 100 + 100 = 500; r1_sum = 50 + 50 = 100
    assert m["rsum"] == pytest.approx(500.0)
    assert m["r1_sum"] == pytest.approx(100.0)


def test_recall_at_5_and_10_boundaries():
    # Prepare: 12 images e_0..e_11. Caption j describes image j and scores 1.0 on r_j other
    # images and 0.5 on its own, so its rank is exactly r_j. Ranks [0, 4, 5, 9, 10].
    images = torch.eye(12)
    ranks = [0, 4, 5, 9, 10]
    texts = torch.zeros(len(ranks), 12)
    for j, r in enumerate(ranks):
        texts[j, j] = 0.5
        others = [i for i in range(12) if i != j][:r]
        texts[j, others] = 1.0
    # Execute
    m = retrieval_metrics(images, texts, list(range(len(ranks))))
    # Assert: R@1 = #{0}/5 = 20; R@5 = #{0, 4}/5 = 40; R@10 = #{0, 4, 5, 9}/5 = 80
    assert m["t2i_r1"] == pytest.approx(20.0)
    assert m["t2i_r5"] == pytest.approx(40.0)
    assert m["t2i_r10"] == pytest.approx(80.0)


def test_ties_count_against_the_query():
    # Prepare: collapsed features, every score equal
    images = torch.ones(3, 4)
    texts = torch.ones(3, 4)
    # Execute
    m = retrieval_metrics(images, texts, [0, 1, 2])
    # Assert: each query has 2 wrong candidates tied with its GT -> rank 2 -> R@1 = 0, R@5 = 100
    assert m["i2t_r1"] == m["t2i_r1"] == 0.0
    assert m["i2t_r5"] == m["t2i_r5"] == pytest.approx(100.0)


def test_chunking_and_non_square_shapes_do_not_change_results():
    # Prepare
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(50, 8, generator=gen)
    t2i = torch.arange(130) % 50
    texts = images[t2i] + 0.8 * torch.randn(130, 8, generator=gen)
    # Execute
    small = retrieval_metrics(images, texts, t2i, chunk_size=7)
    whole = retrieval_metrics(images, texts, t2i, chunk_size=10_000)
    # Assert
    assert small == pytest.approx(whole)
    assert 0.0 < small["t2i_r1"] <= small["t2i_r5"] <= small["t2i_r10"] <= 100.0


def test_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0])
    with pytest.raises(ValueError, match="indices"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 2])


def test_top1_accuracy():
    # Prepare: arg-max per row = [1, 0, 2, 2]; labels [1, 0, 0, 2] -> 3 of 4 right = 75 %
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.1, 0.5], [0.0, 0.0, 1.0]])
    labels = torch.tensor([1, 0, 0, 2])
    # Execute / Assert
    assert top1_accuracy(logits, labels) == pytest.approx(75.0)
    with pytest.raises(ValueError):
        top1_accuracy(logits, labels[:3])


def test_personalised_accuracy_and_bound_by_hand() -> None:
    from fedafd.runtime.retrieval import personalised_accuracy

    # Prepare: 3 classes; test split: class 0 x4 (3 right), class 1 x2 (1 right), class 2 x4 (0 right).
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 1, 1])
    # The device holds classes 0 and 1 only, in shares 3:1.
    train_labels = torch.tensor([0, 0, 0, 1])
    # Execute
    metrics = personalised_accuracy(predictions, labels, train_labels, num_classes=3)
    # Assert: top-1 = 4/10; personalised = 0.75 * 3/4 + 0.25 * 1/2 = 0.6875; bound = 6/10 test rows in held classes.
    assert metrics["top1"] == pytest.approx(40.0)
    assert metrics["pers_top1"] == pytest.approx(68.75)
    assert metrics["top1_bound"] == pytest.approx(60.0)


def test_held_rows_are_the_test_pairs_of_the_categories_a_device_holds() -> None:
    from fedafd.runtime.retrieval import held_rows

    assert held_rows(torch.tensor([3, 1, 3, 0, 2]), torch.tensor([3, 3, 0])).tolist() == [0, 2, 3]


def test_pair_rows_count_each_picture_once_and_each_caption():
    # Prepare: rows are (picture, caption) pairs, as a COCO source is stored: picture 7 has captions in rows
    # 0, 1, 2 (its image features repeated), picture 3 in rows 3, 4. Pictures p7 = [1, 0], p3 = [0, 1].
    image_rows = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 2)
    texts = torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [1.0, 0.0], [0.1, 0.9]])
    image_ids = torch.tensor([7, 7, 7, 3, 3])
    # Execute
    m = pair_retrieval_metrics(image_rows, texts, image_ids)
    # Assert by hand. Candidates are the two pictures (not five rows), in id order: p3 = [0, 1], p7 = [1, 0].
    # i2t p7: captions score [0.6, 0, 0.8, 1.0, 0.1]; its best caption (row 2) 0.8 < row 3's 1.0 (p3's) -> rank 1
    # i2t p3: scores [0.8, 1.0, 0.6, 0, 0.9]; its best caption (row 4) 0.9 < row 1's 1.0 (p7's) -> rank 1.
    #   i2t R@1 = 0, R@5 = R@10 = 100.
    # t2i (five queries): row 0 [p3 0.8, p7 0.6] GT p7 -> rank 1; row 1 [1.0, 0] -> 1; row 2 [0.6, 0.8] -> 0;
    #   row 3 [0, 1.0] GT p3 -> 1; row 4 [0.9, 0.1] GT p3 -> 0. t2i R@1 = 2/5 = 40.
    assert m["i2t_r1"] == pytest.approx(0.0)
    assert m["i2t_r5"] == pytest.approx(100.0)
    assert m["t2i_r1"] == pytest.approx(40.0)
    assert m["t2i_r10"] == pytest.approx(100.0)
    assert m["rsum"] == pytest.approx(0 + 100 + 100 + 40 + 100 + 100)
    # With every row its own picture (the old one-caption reading) the same features give another answer:
    # five candidates, of which rows 0-2 are identical, so the i2t ties count against each query.
    assert pair_retrieval_metrics(image_rows, texts, None) == retrieval_metrics(image_rows, texts, torch.arange(5))
    assert pair_retrieval_metrics(image_rows, texts, None)["t2i_r1"] != pytest.approx(40.0)
