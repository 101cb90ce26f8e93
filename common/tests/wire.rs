//! The wire contract checked against bytes encoded by hand from SPEC §2 field numbers, not from
//! the generated code: a wrong field number or type in `proto/` fails here.

use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::common::{ActorType, ErrorCode};
use flare_storage_common::proto::storage::{
    Message, QueryMessagesBySeqRequest, QueryMessagesRequest, StoreMessageRequest, message_content,
};

/// A minimal protobuf encoder: just enough to write the test messages.
#[derive(Default)]
struct Encoder(Vec<u8>);

impl Encoder {
    fn varint(&mut self, mut value: u64) -> &mut Self {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                self.0.push(byte);
                return self;
            }
            self.0.push(byte | 0x80);
        }
    }

    fn key(&mut self, field: u64, wire_type: u64) -> &mut Self {
        self.varint(field << 3 | wire_type)
    }

    fn uint(&mut self, field: u64, value: u64) -> &mut Self {
        self.key(field, 0).varint(value)
    }

    fn bytes(&mut self, field: u64, value: &[u8]) -> &mut Self {
        self.key(field, 2).varint(value.len() as u64);
        self.0.extend_from_slice(value);
        self
    }

    fn string(&mut self, field: u64, value: &str) -> &mut Self {
        self.bytes(field, value.as_bytes())
    }

    fn message(&mut self, field: u64, build: impl FnOnce(&mut Encoder)) -> &mut Self {
        let mut inner = Encoder::default();
        build(&mut inner);
        self.bytes(field, &inner.0)
    }

    fn map_entry(&mut self, field: u64, key: &str, value: &str) -> &mut Self {
        self.message(field, |entry| {
            entry.string(1, key).string(2, value);
        })
    }
}

#[test]
fn store_message_request_decodes_from_spec_field_numbers() {
    let mut request = Encoder::default();
    request
        .string(1, "session-1")
        .message(2, |message| {
            message
                .string(1, "msg-1")
                .string(2, "session-1")
                .string(3, "alice")
                .string(4, "user")
                .string(5, "bob")
                .string(5, "carol")
                .string(6, "bob")
                .message(7, |content| {
                    content.message(1, |text| {
                        text.string(1, "你好 @bob").message(2, |mention| {
                            mention.string(1, "bob").uint(2, 3).uint(3, 4);
                        });
                    });
                })
                .message(8, |timestamp| {
                    timestamp.uint(1, 1_700_000_000).uint(2, 500);
                })
                .uint(9, 1)
                .string(10, "chat")
                .string(11, "group")
                .string(12, "sent")
                .map_entry(13, "client", "ios")
                .uint(16, 1)
                .uint(17, 30)
                .message(18, |tenant| {
                    tenant.string(1, "tenant-from-message");
                })
                .message(19, |attachment| {
                    attachment.string(1, "file-1").string(3, "image/png").uint(4, 2048);
                })
                .string(21, "important")
                .map_entry(23, "pinned", "true")
                .uint(27, 42);
        })
        .uint(3, 1)
        .message(4, |context| {
            context.string(1, "req-1").message(3, |actor| {
                actor.string(1, "alice").uint(2, 1).string(3, "member");
            });
        })
        .message(5, |tenant| {
            tenant.string(1, "acme").string(2, "im").string(4, "org-9");
        })
        .map_entry(6, "source", "gateway");

    let decoded = StoreMessageRequest::decode(request.0.as_slice()).expect("valid protobuf");
    assert_eq!(decoded.session_id, "session-1");
    assert!(decoded.sync);
    assert_eq!(decoded.tags.get("source").map(String::as_str), Some("gateway"));
    let tenant = decoded.tenant.as_ref().expect("tenant");
    assert_eq!(
        (tenant.tenant_id.as_str(), tenant.business_type.as_str(), tenant.organization_id.as_str()),
        ("acme", "im", "org-9")
    );
    let context = decoded.context.as_ref().expect("context");
    assert_eq!(context.request_id, "req-1");
    let actor = context.actor.as_ref().expect("actor");
    assert_eq!(
        (actor.actor_id.as_str(), actor.r#type, actor.roles.as_slice()),
        ("alice", ActorType::User as i32, &["member".to_owned()][..])
    );

    let message = decoded.message.as_ref().expect("message");
    assert_eq!(message.id, "msg-1");
    assert_eq!(message.session_id, "session-1");
    assert_eq!(message.sender_id, "alice");
    assert_eq!(message.sender_type, "user");
    assert_eq!(message.receiver_ids, ["bob", "carol"]);
    assert_eq!(message.receiver_id, "bob");
    let Some(message_content::Content::Text(text)) = message.content.as_ref().and_then(|c| c.content.as_ref()) else {
        panic!("expected text content, got {:?}", message.content);
    };
    assert_eq!(text.text, "你好 @bob");
    assert_eq!((text.mentions[0].user_id.as_str(), text.mentions[0].start, text.mentions[0].length), ("bob", 3, 4));
    let timestamp = message.timestamp.as_ref().expect("timestamp");
    assert_eq!((timestamp.seconds, timestamp.nanos), (1_700_000_000, 500));
    assert_eq!(message.message_type, 1);
    assert_eq!(
        (message.business_type.as_str(), message.session_type.as_str(), message.status.as_str()),
        ("chat", "group", "sent")
    );
    assert_eq!(message.extra.get("client").map(String::as_str), Some("ios"));
    assert!(message.is_burn_after_read);
    assert_eq!(message.burn_after_seconds, 30);
    assert_eq!(message.tenant.as_ref().map(|t| t.tenant_id.as_str()), Some("tenant-from-message"));
    assert_eq!(message.attachments[0].file_id, "file-1");
    assert_eq!(message.attachments[0].mime_type, "image/png");
    assert_eq!(message.attachments[0].size, 2048);
    assert_eq!(message.tags, ["important"]);
    assert_eq!(message.attributes.get("pinned").map(String::as_str), Some("true"));
    assert_eq!(message.seq, 42);
}

#[test]
fn query_messages_request_decodes_from_spec_field_numbers() {
    let mut request = Encoder::default();
    request
        .string(1, "session-1")
        .uint(2, 1_700_000_000_000)
        .uint(3, 1_700_000_600_000)
        .uint(4, 20)
        .string(5, "cursor-a")
        .message(6, |context| {
            context.message(3, |actor| {
                actor.string(1, "alice");
            });
        })
        .message(7, |tenant| {
            tenant.string(1, "acme");
        })
        .message(8, |pagination| {
            pagination.string(1, "cursor-b").uint(2, 50).uint(3, 1).string(4, "prev").uint(5, 7);
        });

    let decoded = QueryMessagesRequest::decode(request.0.as_slice()).expect("valid protobuf");
    assert_eq!(decoded.session_id, "session-1");
    assert_eq!(decoded.start_time, 1_700_000_000_000);
    assert_eq!(decoded.end_time, 1_700_000_600_000);
    assert_eq!(decoded.limit, 20);
    assert_eq!(decoded.cursor, "cursor-a");
    assert_eq!(decoded.context.and_then(|c| c.actor).map(|a| a.actor_id).as_deref(), Some("alice"));
    assert_eq!(decoded.tenant.map(|t| t.tenant_id).as_deref(), Some("acme"));
    let pagination = decoded.pagination.expect("pagination");
    assert_eq!(pagination.cursor, "cursor-b");
    assert_eq!(pagination.limit, 50);
    assert!(pagination.has_more);
    assert_eq!(pagination.previous_cursor, "prev");
    assert_eq!(pagination.total_size, 7);
}

#[test]
fn query_messages_by_seq_request_uses_its_spec_numbers() {
    let mut request = Encoder::default();
    request.string(1, "session-1").uint(2, 10).uint(3, 20).uint(4, 5).string(5, "bob").message(7, |tenant| {
        tenant.string(1, "acme");
    });
    let decoded = QueryMessagesBySeqRequest::decode(request.0.as_slice()).expect("valid protobuf");
    assert_eq!((decoded.after_seq, decoded.before_seq, decoded.limit), (10, 20, 5));
    assert_eq!(decoded.user_id, "bob");
    assert_eq!(decoded.tenant.map(|t| t.tenant_id).as_deref(), Some("acme"));
}

#[test]
fn message_seq_is_field_27_and_error_codes_match() {
    let encoded = Message { seq: 5, ..Default::default() }.encode_to_vec();
    // Field 27, varint: key (27 << 3 | 0) = 216 = 0xd8 0x01, then the value.
    assert_eq!(encoded, [0xd8, 0x01, 0x05]);
    assert_eq!(ErrorCode::Ok as i32, 1);
    assert_eq!(ErrorCode::InvalidArgument as i32, 10);
    assert_eq!(ErrorCode::NotFound as i32, 30);
    assert_eq!(ErrorCode::PermissionDenied as i32, 21);
    assert_eq!(ErrorCode::Unavailable as i32, 51);
    assert_eq!(ErrorCode::NotImplemented as i32, 62);
}
