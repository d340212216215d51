//! Undoable edits: the entries they change with their values before and after, so that applying and
//! reverting cost time in proportion to the project, never a copy of it per edit.

use super::LabelEntry;

#[derive(Debug, Clone)]
pub(super) enum Change {
    /// (index, before, after).
    Update(Vec<(usize, LabelEntry, LabelEntry)>),
    /// Entries at their indices in the list after the insertion, ascending.
    Insert(Vec<(usize, LabelEntry)>),
    /// Entries at their indices in the list before the removal, ascending.
    Remove(Vec<(usize, LabelEntry)>),
}

#[derive(Debug, Clone)]
pub(super) struct Edit {
    changes: Vec<Change>,
    /// The class list before and after, when it changes.
    classes: Option<(Vec<String>, Vec<String>)>,
}

impl Edit {
    pub(super) fn new(
        changes: Vec<Change>,
        classes_before: &[String],
        classes_after: Vec<String>,
    ) -> Edit {
        let classes = (classes_before != classes_after.as_slice())
            .then(|| (classes_before.to_vec(), classes_after));
        Edit { changes, classes }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.classes.is_none()
    }

    pub(super) fn apply(&self, entries: &mut Vec<LabelEntry>, classes: &mut Vec<String>) {
        for change in &self.changes {
            match change {
                Change::Update(list) => {
                    for (i, _, after) in list {
                        entries[*i] = after.clone();
                    }
                }
                Change::Insert(list) => insert_at(entries, list),
                Change::Remove(list) => remove_at(entries, list),
            }
        }
        if let Some((_, after)) = &self.classes {
            classes.clone_from(after);
        }
    }

    pub(super) fn revert(&self, entries: &mut Vec<LabelEntry>, classes: &mut Vec<String>) {
        for change in self.changes.iter().rev() {
            match change {
                Change::Update(list) => {
                    for (i, before, _) in list {
                        entries[*i] = before.clone();
                    }
                }
                Change::Insert(list) => remove_at(entries, list),
                Change::Remove(list) => insert_at(entries, list),
            }
        }
        if let Some((before, _)) = &self.classes {
            classes.clone_from(before);
        }
    }
}

/// Inserts entries so that each ends at its index (ascending), in one pass.
fn insert_at(entries: &mut Vec<LabelEntry>, list: &[(usize, LabelEntry)]) {
    let old = std::mem::take(entries);
    let total = old.len() + list.len();
    let mut old = old.into_iter();
    let mut new = list.iter().peekable();
    entries.reserve(total);
    for position in 0..total {
        match new.next_if(|(i, _)| *i == position) {
            Some((_, e)) => entries.push(e.clone()),
            None => entries.extend(old.next()),
        }
    }
    // Indices past the end (never made by the set) land at the end rather than vanish.
    entries.extend(new.map(|(_, e)| e.clone()));
    entries.extend(old);
}

/// Removes the entries at the (ascending) indices, in one pass.
fn remove_at(entries: &mut Vec<LabelEntry>, list: &[(usize, LabelEntry)]) {
    let mut gone = list.iter().map(|(i, _)| *i).peekable();
    let mut position = 0;
    entries.retain(|_| {
        let keep = gone.next_if_eq(&position).is_none();
        position += 1;
        keep
    });
}
