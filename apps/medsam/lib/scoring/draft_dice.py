"""The `draft_dice` scoring method: how much annotators changed the model's drafts."""

from __future__ import annotations

from medsam_engine.scoring import draft_dice_files
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod


class DraftDice(ScoringMethod):
    """Per image with both labels: foreground Dice of the draft (`original`) against the `final`
    label, stored in the image's info as `draft_dice`; the mean over images is returned as well."""

    def __init__(self) -> None:
        super().__init__("Dice between the model's draft (original) and the annotator's final label, per image")

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        draft_tag = request.get("y_pred", DefaultLabelTag.ORIGINAL.value)
        final_tag = request.get("y", DefaultLabelTag.FINAL.value)
        scores = {}
        for image_id in sorted(datastore.list_images()):
            draft = datastore.get_label_by_image_id(image_id, draft_tag)
            final = datastore.get_label_by_image_id(image_id, final_tag)
            if draft and final:
                value = draft_dice_files(datastore.get_label_uri(draft, draft_tag),
                                         datastore.get_label_uri(final, final_tag))
                datastore.update_image_info(image_id, {"draft_dice": value})
                scores[image_id] = value
        mean = sum(scores.values()) / len(scores) if scores else None
        return {"draft_dice": scores, "mean": mean, "images": len(scores)}
