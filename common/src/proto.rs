//! Code generated from `proto/` at build time (see `build.rs`). Modules nest like the protobuf
//! packages because prost refers to other packages by relative paths.

#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod flare {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("flare.common.v1");
        }
    }
    pub mod storage {
        pub mod v1 {
            tonic::include_proto!("flare.storage.v1");
        }
    }
}

pub use flare::common::v1 as common;
pub use flare::storage::v1 as storage;

/// Encoded `FileDescriptorSet` of every proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/flare_descriptor.bin"));

/// The storage package as the reader serves it: the same messages and service, except that
/// each `Message` in a response is an [`EncodedMessage`], so a page can be sent as the bytes
/// the hot window stores, without decoding them. Types without a `Message` are those of
/// [`storage`].
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod serving {
    include!(concat!(env!("OUT_DIR"), "/serving/flare.storage.v1.rs"));
}

/// A `flare.storage.v1.Message` already encoded: protobuf's encoding of its fields, exactly
/// what goes between the length prefix of an embedded-message field. Sent as is; built from a
/// `Message` by [`EncodedMessage::from`] or taken from a store that kept the encoding.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EncodedMessage(pub Vec<u8>);

impl From<&storage::Message> for EncodedMessage {
    fn from(message: &storage::Message) -> Self {
        Self(prost::Message::encode_to_vec(message))
    }
}

impl EncodedMessage {
    /// The message these bytes encode.
    pub fn decode(&self) -> Result<storage::Message, prost::DecodeError> {
        prost::Message::decode(self.0.as_slice())
    }
}

impl std::fmt::Debug for EncodedMessage {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "EncodedMessage({} bytes)", self.0.len())
    }
}

impl prost::Message for EncodedMessage {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    /// Decoding appends each field as `Message` reads it, encoded again: protobuf merges
    /// concatenated encodings, so the bytes stay a valid `Message`. Fields `Message` does not
    /// know are dropped, as decoding into `Message` drops them.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        let mut field = storage::Message::default();
        field.merge_field(tag, wire_type, buf, ctx)?;
        field.encode_raw(&mut self.0);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn message(id: &str, text: &str) -> storage::Message {
        storage::Message {
            id: id.into(),
            session_id: "s".into(),
            seq: 7,
            content: Some(storage::MessageContent {
                content: Some(storage::message_content::Content::Text(storage::TextContent {
                    text: text.into(),
                    mentions: vec![],
                })),
            }),
            tags: vec!["starred".into()],
            ..Default::default()
        }
    }

    /// A served response holding encoded messages is, byte for byte, the client's response
    /// holding those messages, and reads back as it.
    #[test]
    fn served_responses_are_the_clients_bytes() {
        let messages = vec![message("a", "你好"), message("b", ""), storage::Message::default()];
        let client = storage::QueryMessagesResponse {
            messages: messages.clone(),
            next_cursor: "c".into(),
            has_more: true,
            ..Default::default()
        };
        let served = serving::QueryMessagesResponse {
            messages: messages.iter().map(EncodedMessage::from).collect(),
            next_cursor: "c".into(),
            has_more: true,
            ..Default::default()
        };
        assert_eq!(served.encode_to_vec(), client.encode_to_vec());
        let read = serving::QueryMessagesResponse::decode(client.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(read, served);
        let one = serving::GetMessageResponse { message: Some(EncodedMessage::from(&messages[0])), status: None };
        let decoded = storage::GetMessageResponse::decode(one.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(decoded.message.as_ref(), Some(&messages[0]));
    }
}
