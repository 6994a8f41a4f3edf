//! Consuming a large list while giving its memory back.
//!
//! Owns [`drain_freeing`]. A 100k-table pull turns lists of 250k items (events,
//! records, paths) into others; taken from the front of a buffer that shrinks as
//! it empties, the two lists are never both whole at once.

/// The items of `v`, in order, its buffer shrinking as it empties.
pub fn drain_freeing<T>(mut v: Vec<T>) -> DrainFreeing<T> {
    v.reverse();
    DrainFreeing { rest: v }
}

/// See [`drain_freeing`].
pub struct DrainFreeing<T> {
    /// What is left, last item first.
    rest: Vec<T>,
}

impl<T> Iterator for DrainFreeing<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        let item = self.rest.pop()?;
        if self.rest.capacity() > 2 * self.rest.len() + 1024 {
            self.rest.shrink_to_fit();
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn items_come_in_order_and_the_buffer_shrinks() {
        let v: Vec<u32> = (0..10_000).collect();
        let mut d = super::drain_freeing(v);
        assert_eq!(
            d.by_ref().take(9_000).collect::<Vec<_>>(),
            (0..9_000).collect::<Vec<_>>()
        );
        assert!(d.rest.capacity() < 4_000, "{}", d.rest.capacity());
        assert_eq!(d.collect::<Vec<_>>(), (9_000..10_000).collect::<Vec<_>>());
    }
}
